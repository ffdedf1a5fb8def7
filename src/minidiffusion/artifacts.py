"""Trained components on disk, saved one way everywhere: `NAME.safetensors` beside `NAME.toml`.

A *component* is one trained network: a diffusion model (U-Net + objective), a classifier, and as
they land a VAE, a text encoder. Its weights are a float32 state dict in safetensors, whose
header metadata holds `format`, `kind` (what the component is) and whatever else it needs
(e.g. `classes`, a JSON list); its config is the TOML file with the same stem, which rebuilds
the network. A *pipeline* is a folder of components. Nothing here ever unpickles.

Reading refuses, each with one sentence: pickle files (whatever their suffix), missing, empty,
truncated or non-safetensors weights, a config that is not TOML, and weights whose tensors do not
match the network the config builds. Writing is atomic (paths.atomic_write), config last, so a
reader never sees new weights beside an old config.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import dump_toml, from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .paths import atomic_write, save_safetensors

__all__ = ["FORMAT", "PICKLE_SUFFIXES", "Component", "save_component", "read_component", "read_safetensors",
           "component_kind",
           "read_toml", "config_from_file", "component_files", "load_state", "check_state_dict", "refuse_pickle",
           "half_precision_copy"]

FORMAT = "minidiffusion-component-1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip; pickle


@dataclass
class Component:
    """One component read from disk: tensors (CPU), its config as a plain dict, header metadata, paths."""

    tensors: dict[str, torch.Tensor]
    config: dict
    metadata: dict[str, str] = field(default_factory=dict)
    weights: Path | None = None
    config_path: Path | None = None

    @property
    def kind(self) -> str | None:
        """What the component is ("diffusion", "classifier", ...), or None for files saved before kinds."""
        return self.metadata.get("kind")


def refuse_pickle(path: str | Path) -> None:
    """Raise CheckpointError: `path` is a Python pickle, which can run arbitrary code when loaded."""
    path = Path(path)
    raise CheckpointError(
        f"refusing to load {path}: it is a Python pickle (torch.save), and unpickling can execute "
        "arbitrary code; convert it once, in an environment you trust, with "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors') "
        "and load the .safetensors file instead")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors on `device`, header metadata) of a .safetensors file; damaged files raise CheckpointError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file; give its model.safetensors or the run folder")
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}; check the path (a trained run holds model.safetensors)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): the write that made it was cut short; train again "
                              "or copy the file again")
    if head.startswith(_PICKLE_MAGIC):
        refuse_pickle(path)
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}); it is truncated, damaged "
                              "or another format: train again or copy it again") from None
    return tensors, metadata


def component_kind(path: str | Path) -> str | None:
    """Return the `kind` in a .safetensors file's header (None for files saved before kinds, or unreadable ones)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    if "kind" in meta:
        return meta["kind"]
    return "diffusion" if "classes" in meta else None  # the diffusion models shipped before kinds carry classes


def read_toml(path: str | Path) -> dict:
    """Return a TOML file as a dict; a missing, unreadable or invalid file raises ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"missing config {path}; a trained component needs its .toml next to its .safetensors")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); restore the file the training run wrote") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None


def config_from_file(cls: type, d: dict, path: str | Path):
    """Return `from_dict(cls, d)`, with any ConfigError's sentence prefixed by the file it came from."""
    try:
        return from_dict(cls, d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def component_files(path: str | Path, name: str = "model") -> tuple[Path, Path]:
    """Return (weights, config) for a component given as NAME.safetensors, NAME.toml or a folder holding NAME.*."""
    path = Path(path)
    if path.is_dir():
        return path / f"{name}.safetensors", path / f"{name}.toml"
    if path.suffix == ".toml":
        return path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".toml")


def save_component(path: str | Path, tensors: dict[str, torch.Tensor], config: Any, kind: str,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write `path` (NAME.safetensors: tensors + metadata with `kind`) and NAME.toml (`config`, a dataclass or
    dict); return the weights path. Both writes are atomic, the config last."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"a component is saved as NAME.safetensors, got {path}")
    meta = {"format": FORMAT, "kind": kind, **(metadata or {})}
    save_safetensors(tensors, path, metadata=meta)
    cfg = to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
    with atomic_write(path.with_suffix(".toml")) as tmp:
        tmp.write_text(dump_toml(cfg))
    return path


def half_precision_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a component (NAME.safetensors + NAME.toml) to `dst` (a .safetensors path) with its float32 tensors
    stored as float16, half the bytes, header metadata kept; return the new weights path. Loading casts them back
    to the network's float32 (load_state_dict copies), so a model shipped this way samples with its weights
    rounded to float16: close to, not bit-identical with, the run it came from."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ConfigError(f"a component is saved as NAME.safetensors, got {dst}")
    weights, config_path = component_files(src)
    tensors, metadata = read_safetensors(weights)
    half = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    save_safetensors(half, dst, metadata={**metadata, "stored_dtype": "float16"})
    with atomic_write(dst.with_suffix(".toml")) as tmp:
        tmp.write_text(config_path.read_text())
    return dst


def read_component(path: str | Path, kind: str | None = None, name: str = "model",
                   config: str | Path | None = None) -> Component:
    """Read a component (file or folder, see `component_files`; `config` overrides where its TOML is);
    refuse it if its kind is not `kind`. Files written before kinds existed have no `kind` and are
    accepted for any.
    """
    weights, config_path = component_files(path, name)
    config_path = Path(config) if config is not None else config_path
    if weights.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(weights)
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights} is not a .safetensors file; only safetensors weights are loaded "
                              "(pickled .pt/.pkl files can run arbitrary code)")
    tensors, metadata = read_safetensors(weights)
    comp = Component(tensors, read_toml(config_path), metadata, weights, config_path)
    if kind is not None and comp.kind not in (None, kind):
        raise CheckpointError(f"{weights} holds a {comp.kind} model, not a {kind} model; give the path of a "
                              f"{kind} model")
    return comp


def _preview(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming the first few missing/unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in got and tuple(got[k].shape) != tuple(v.shape)]
    problems = [f"{label}: {_preview(names)}" for label, names in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches (saved vs model)", shapes)) if names]
    if problems:
        raise CheckpointError(f"{what} does not match the model ({'; '.join(problems)}); build the model "
                              "with the configuration the weights were saved with")


def load_state(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load `tensors` into `module` after checking every key and shape (CheckpointError); return the module."""
    check_state_dict(module.state_dict(), tensors, what)
    module.load_state_dict(tensors)
    return module


def classes_metadata(class_names) -> dict[str, str]:
    """Return the metadata entry that records a component's class names (a JSON list)."""
    return {"classes": json.dumps(list(class_names or []))}

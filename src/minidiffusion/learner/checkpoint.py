"""Checkpoints: tensors in safetensors, the rest in a small JSON, written atomically; resume.

A checkpoint is a directory `ckpt-{seq:06d}-e{epoch:04d}-i{iter:06d}` (a save counter, then the
epoch/iteration training continues from) holding

    state.safetensors   every tensor: model, optimizer moments, EMA, RNG states, loss logs...
    meta.json           epoch, iter, step, config, metrics, the SHA-256 of state.safetensors, and
                        the non-tensor rest of the training state (optimizer param_groups,
                        scheduler state, python/numpy RNG) with {"__tensor__": key} references

Both files are written into a hidden staging directory and fsynced, which is then renamed into
place with os.replace: a crash mid-write leaves the earlier checkpoints untouched. Loading checks
the SHA-256, and never unpickles anything (`.pt`, `.pth`, `.pkl`, `.bin` are refused).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import PICKLE_SUFFIXES, check_state_dict, read_safetensors, refuse_pickle
from ..errors import CheckpointError, ConfigError
from ..paths import save_safetensors, sha256_file
from .callback import Callback
from .state import capture_rng, flatten_state, restore_rng, unflatten_state

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "load_weights",
           "CheckpointCB"]

TENSORS, META = "state.safetensors", "meta.json"
_NAME = re.compile(r"ckpt-(\d{6})-e(\d{4})-i(\d{6})$")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some systems (Windows); nothing to flush then
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` (safetensors) and `meta` (JSON) into directory `path_dir` atomically; returns it."""
    path_dir = Path(path_dir)
    path_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = path_dir.with_name(f".{path_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_safetensors(tensors, staging / TENSORS)
        _fsync(staging / TENSORS)
        files = {TENSORS: {"sha256": sha256_file(staging / TENSORS), "bytes": (staging / TENSORS).stat().st_size}}
        with open(staging / META, "w") as f:  # one line per top-level key: readable, yet small
            meta = {**meta, "files": files}
            lines = [f"{json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in meta.items()]
            f.write("{\n" + ",\n".join(lines) + "\n}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(staging)
        if path_dir.exists():  # same name saved again: move the old one aside, then delete it
            old = path_dir.with_name(f".{path_dir.name}.del-{os.getpid()}")
            os.replace(path_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, path_dir)
        _fsync(path_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path_dir


def load_checkpoint(path: str | Path,
                    device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors on `device`, meta) of a checkpoint directory or a bare .safetensors file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; check the path, or train without resume")
    if path.is_dir():
        if not (path / META).is_file():
            pickles = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickles:
                refuse_pickle(pickles[0])
            raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); its write was "
                                  "interrupted: use an earlier checkpoint")
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / META} is not valid JSON ({e}); the checkpoint is damaged, "
                                  "use an earlier one") from e
        file, expected = path / TENSORS, meta.get("files", {}).get(TENSORS, {})
        if not file.is_file() or file.stat().st_size != expected.get("bytes") or \
                sha256_file(file) != expected.get("sha256"):
            raise CheckpointError(f"{file} is missing or does not match the SHA-256 in {META}; the "
                                  "checkpoint is damaged (disk full, edited, truncated): use an earlier one")
    else:
        file, meta = path, {}
    return read_safetensors(file, device)[0], meta


def list_checkpoints(dir: str | Path) -> list[Path]:
    """Return the finished checkpoint directories in `dir`, oldest first (by save counter)."""
    dir = Path(dir)
    if not dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(dir: str | Path) -> Path | None:
    """Return the newest checkpoint directory in `dir`, or None."""
    found = list_checkpoints(dir)
    return found[-1] if found else None


def load_weights(model: nn.Module, path: str | Path, ema: bool = False) -> nn.Module:
    """Load model (or, with `ema=True`, EMA) weights from a checkpoint or .safetensors file; returns model."""
    tensors, meta = load_checkpoint(path)
    if meta:
        tree = unflatten_state(meta["state"], tensors)
        if ema:
            states = [s["model"] for s in tree.get("callbacks", {}).values() if isinstance(s, dict)
                      and "ema_updates" in s]
            if not states:
                raise CheckpointError(f"{path} holds no EMA weights; train with EMACB or load with ema=False")
            tensors = states[0]
        else:
            tensors = tree["model"]
    check_state_dict(model.state_dict(), tensors, f"checkpoint {path}")
    model.load_state_dict(tensors)
    return model


def _jsonable(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


class CheckpointCB(Callback):
    """Save the full training state after each epoch (after validation) and every N steps; resume.

    `dir` defaults to `learn.path/'checkpoints'`; only the newest `keep` checkpoints are kept.
    With `learn.fit(..., resume=True)` it restores the newest readable checkpoint in before_fit --
    after every other callback built its scheduler/EMA/scaler (hence the high order) -- and sets
    learn.start_epoch/start_iter/step so training continues exactly where it stopped. Callbacks
    with `state_dict()`/`load_state_dict()` are saved and restored by class name.
    """

    order = 1000
    resumes = True  # Learner.fit(resume=True) refuses to run without such a callback
    skip_in_lr_find = True

    def __init__(self, dir: str | Path | None = None, every_n_steps: int | None = None, keep: int = 2,
                 config: Any = None):
        if keep < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise ConfigError(f"CheckpointCB needs keep >= 1 and every_n_steps >= 1 or None, got "
                              f"keep={keep}, every_n_steps={every_n_steps}")
        self.dir = Path(dir) if dir is not None else None
        self.every_n_steps, self.keep, self.config = every_n_steps, keep, config
        self.last_saved: Path | None = None

    def _stateful(self, learn) -> dict[str, Callback]:
        named: dict[str, Callback] = {}
        for cb in sorted(learn.cbs, key=lambda c: c.order):
            if cb is not self and callable(getattr(cb, "state_dict", None)) and \
                    callable(getattr(cb, "load_state_dict", None)):
                name, i = cb.checkpoint_key(), 1
                while name in named:
                    name, i = f"{cb.checkpoint_key()}-{i}", i + 1
                named[name] = cb
        return named

    def before_fit(self, learn) -> None:
        if self.dir is None and learn.path is None:
            raise ConfigError("CheckpointCB needs a directory: pass dir=... or give the Learner a path")
        self.directory = self.dir if self.dir is not None else learn.path / "checkpoints"
        for stale in self.directory.glob(".ckpt-*"):  # staging dirs of interrupted writes
            shutil.rmtree(stale, ignore_errors=True)
        if learn.resume:
            self.restore(learn)

    def after_batch(self, learn) -> None:
        if learn.training and self.every_n_steps and learn.step % self.every_n_steps == 0:
            self.save(learn, learn.epoch, learn.iter + 1)

    def after_epoch(self, learn) -> None:
        if not learn.training or not learn.do_valid:
            self.save(learn, learn.epoch + 1, 0)

    def save(self, learn, epoch: int, iter: int) -> Path:
        """Write a checkpoint to continue at (`epoch`, `iter`); returns its directory."""
        tree = {"model": learn.model.state_dict(), "optimizer": learn.opt.state_dict(),
                "callbacks": {k: cb.state_dict() for k, cb in self._stateful(learn).items()},
                "rng": capture_rng()}
        tensors, skeleton = flatten_state(tree)
        config = self.config if self.config is not None else getattr(learn, "config", None)
        meta = {"format": 1, "epoch": epoch, "iter": iter, "step": learn.step, "n_epochs": learn.n_epochs,
                "config": _jsonable(config), "metrics": getattr(learn, "last_metrics", None),
                "state": skeleton}
        existing = list_checkpoints(self.directory)
        seq = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1
        self.last_saved = save_checkpoint(self.directory / f"ckpt-{seq:06d}-e{epoch:04d}-i{iter:06d}",
                                          tensors, meta)
        for old in [*existing, self.last_saved][:-self.keep]:
            trash = old.with_name(f".{old.name}.del")  # rename first: never a half-deleted checkpoint
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return self.last_saved

    def _newest_readable(self) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
        found, errors = list_checkpoints(self.directory), []
        for path in reversed(found):
            try:
                return (path, *load_checkpoint(path))
            except CheckpointError as e:
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=3)
                errors.append(str(e))
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {self.directory} can be read "
                                  f"(first problem: {errors[0]}); start without resume=True")
        return None

    def restore(self, learn) -> Path | None:
        """Load the newest readable checkpoint into the learner; returns its path (None: none yet)."""
        found = self._newest_readable()
        if found is None:
            print(f"CheckpointCB: no checkpoint in {self.directory}, starting from scratch")
            return None
        path, tensors, meta = found
        tree = unflatten_state(meta["state"], tensors)
        check_state_dict(learn.model.state_dict(), tree["model"], f"checkpoint {path}")
        learn.model.load_state_dict(tree["model"])
        try:
            learn.opt.load_state_dict(tree["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"the optimizer state in {path} does not fit this optimizer ({e}); use the "
                                  "same optimizer and parameter groups as the saved run") from e
        saved, current = tree.get("callbacks", {}), self._stateful(learn)
        for name in sorted(set(saved) ^ set(current)):
            warnings.warn(f"{name} is {'only in' if name in saved else 'not in'} checkpoint {path}: its "
                          "state starts fresh, so the run will not continue exactly", stacklevel=2)
        for name in set(saved) & set(current):
            current[name].load_state_dict(saved[name])
        restore_rng(tree["rng"])
        learn.start_epoch, learn.start_iter, learn.step = meta["epoch"], meta["iter"], meta["step"]
        print(f"CheckpointCB: resumed from {path.name} (epoch {meta['epoch']}, iteration {meta['iter']}, "
              f"step {meta['step']})")
        return path

"""Where minidiffusion keeps files of its own, how it writes tensors to them, and how it fingerprints them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["cache_dir", "float32_state", "save_safetensors", "sha256_file"]


def cache_dir(*parts: str) -> Path:
    """Return the minidiffusion cache folder `$XDG_CACHE_HOME/minidiffusion/<parts>` (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "minidiffusion", *parts)


def float32_state(module) -> dict:
    """Return `module`'s state dict with floating tensors cast to float32: the format of saved weights."""
    return {k: v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()}


def _for_safetensors(tensors: dict) -> dict:
    """Detached, contiguous CPU tensors; clones where storage is shared (tied weights, views)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen or t.numel() == 0 else t
        seen.add(ptr)
    return out


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (name -> tensor, any device) to a .safetensors file at `path`; return the path.

    Tensors are moved to the CPU, made contiguous and unshared (tied weights and views are cloned),
    as safetensors requires. safetensors itself creates the file readable by its owner only (mode
    600); this gives it the mode any other new file gets under the process's umask (usually 644),
    so shared models and caches stay readable by the other users of a machine.
    """
    from safetensors.torch import save_file

    path = Path(path)
    save_file(_for_safetensors(tensors), str(path), metadata=metadata)
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def sha256_file(path: str | Path) -> str:
    """Return the SHA-256 of a file's bytes as 64 hex digits, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

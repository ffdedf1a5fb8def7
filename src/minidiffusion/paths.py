"""Files: where minidiffusion keeps its own, how it writes them (atomically), and how it fingerprints them.

Every file the package writes goes through `atomic_write`: the bytes land in a hidden temporary
file next to the target, which is renamed over the target only once complete. A crash, a full
disk or an error mid-write leaves the previous file (or no file) in place, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

__all__ = ["cache_dir", "atomic_write", "check_writable", "float32_state", "save_safetensors", "sha256_file"]


def cache_dir(*parts: str) -> Path:
    """Return the minidiffusion cache folder `$XDG_CACHE_HOME/minidiffusion/<parts>` (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "minidiffusion", *parts)


def _why(e: OSError) -> str:
    return {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
            errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "it is a folder", errno.EEXIST: "a file is in the way"}.get(e.errno, e.strerror or str(e))


def check_writable(path: str | Path) -> Path:
    """Return `path` if a file can be written there (its folder exists or can be made); else raise OutputError.

    Called before long work starts, so a bad `--out` is refused before minutes of sampling or training.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name, e.g. {path / 'out.png'}")
    parent = path.parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write {path}: permission denied in {folder}; choose another path")
            break
    return path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without error, rename it onto `path`.

    The parent folder is created. On any error the temporary file is removed and `path` is untouched;
    an OSError (no permission, disk full, a file where a folder should be) becomes an OutputError
    with one sentence naming the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_why(e)}; choose another path or free the space") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


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
    """Write `tensors` (name -> tensor, any device) to a .safetensors file at `path`, atomically; return the path.

    Tensors are moved to the CPU, made contiguous and unshared (tied weights and views are cloned),
    as safetensors requires. safetensors itself creates the file readable by its owner only (mode
    600); this gives it the mode any other new file gets under the process's umask (usually 644),
    so shared models and caches stay readable by the other users of a machine.
    """
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(_for_safetensors(tensors), str(tmp), metadata=metadata)
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return path


def sha256_file(path: str | Path) -> str:
    """Return the SHA-256 of a file's bytes as 64 hex digits, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

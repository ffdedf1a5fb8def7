"""Where minidiffusion keeps files of its own, and how it fingerprints them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["cache_dir", "sha256_file"]


def cache_dir(*parts: str) -> Path:
    """Return the minidiffusion cache folder `$XDG_CACHE_HOME/minidiffusion/<parts>` (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "minidiffusion", *parts)


def sha256_file(path: str | Path) -> str:
    """Return the SHA-256 of a file's bytes as 64 hex digits, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

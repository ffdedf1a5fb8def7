"""Train on your own images: a folder of PNG/JPEG files, decoded once, cached as safetensors.

Layout: `root/<class>/**/*.png` gives one class per sub-folder (names sorted);
images directly in `root` (and no class sub-folders) give an unlabelled set.
Every image is centre-cropped to a square and resized with Lanczos to
`image_size`, as grayscale ("L") or RGB. The decoded uint8 tensor is cached in
`$XDG_CACHE_HOME/minidiffusion/folders/<key>.safetensors`, where the key hashes
the sorted relative paths, sizes and modification times of the files plus the
decode settings, so a second load skips decoding and any changed file re-decodes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, OutputError
from ..paths import cache_dir, save_safetensors
from .loaders import DataLoaders, uint8_loaders

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image_folder", "image_folder_loaders"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def list_images(root: str | Path) -> tuple[list[Path], list[str] | None]:
    """Return (image paths relative to `root`, sorted; class names sorted, or None when unlabelled).

    Hidden files and folders (names starting with '.') are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder; pass the folder holding "
                        "your .png/.jpg images")
    files = sorted(p.relative_to(root) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    nested = [p for p in files if len(p.parts) > 1]
    if not nested:
        return files, None
    loose = len(files) - len(nested)
    if loose:
        warnings.warn(f"{root}: ignoring {loose} image(s) directly in the folder, since its sub-folders "
                      "are used as classes; move them into a class sub-folder to use them", stacklevel=3)
    return nested, sorted({p.parts[0] for p in nested})


def _decode(path: Path, image_size: int, gray: bool) -> np.ndarray:
    """Return one image as uint8 [S, S] (gray) or [S, S, 3]: centre square, Lanczos-resized."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft("L" if gray else "RGB", (image_size, image_size))  # JPEG: decode at reduced size
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):  # 16/32-bit gray: Pillow's convert("L") clips at 255 instead of scaling
            arr = np.asarray(img, dtype=np.float64)
            scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
            img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # transparent -> white
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        img = ImageOps.fit(img.convert("L" if gray else "RGB"), (image_size, image_size),
                           method=Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)


def _is_gray(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as img:  # reads the header only
        return img.mode in _GRAY_MODES


def _decode_all(root: Path, files: list[Path], image_size: int,
                channels: int | None) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Return (uint8 [N, C, S, S], indices of the files decoded, [(path, reason) skipped])."""
    arrays, kept, skipped = [], [], []
    for i, rel in enumerate(files):
        path = root / rel
        try:
            gray = channels == 1 or (channels is None and _is_gray(path))
            arrays.append(_decode(path, image_size, gray))
            kept.append(i)
        except Exception as e:  # Pillow raises many types for broken files (OSError, SyntaxError, ...)
            skipped.append((str(path), f"{type(e).__name__}: {e}"))
    if not arrays:
        return np.zeros((0, channels or 1, image_size, image_size), np.uint8), kept, skipped
    c = channels or (1 if all(a.ndim == 2 for a in arrays) else 3)
    if c == 1:
        return np.stack(arrays)[:, None], kept, skipped
    # gray images in a colour set become RGB by repeating the channel (what PIL's L->RGB does)
    rgb = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    return np.ascontiguousarray(np.stack(rgb).transpose(0, 3, 1, 2)), kept, skipped


def _cache_key(root: Path, files: list[Path], image_size: int, channels: int | None) -> str:
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, image_size, channels]).encode())
    for rel in files:
        st = (root / rel).stat()
        h.update(f"{rel.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, list] | None:
    """Return a cached (images, labels, class_names, skipped), or None if absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images = f.get_tensor("images")
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
        return images, labels, json.loads(meta["class_names"]), json.loads(meta["skipped"])
    except Exception:  # a damaged cache file is just a cache miss; it is rewritten below
        return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor | None,
                 class_names: list[str] | None, skipped: list) -> None:
    """Write the cache (atomically, see paths.save_safetensors); failure to write only costs speed."""
    tensors = {"images": images} if labels is None else {"images": images, "labels": labels}
    meta = {"class_names": json.dumps(class_names), "skipped": json.dumps(skipped)}
    try:
        save_safetensors(tensors, path, metadata=meta)
    except OutputError as e:
        warnings.warn(f"could not write the image cache ({e}); the folder will be decoded again next time",
                      stacklevel=3)


def load_image_folder(root: str | Path, image_size: int, channels: int | None = None, cache: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Return (images uint8 [N, C, S, S] in 0..255, labels int64 [N] or None, class names or None).

    `channels`: 1 (grayscale), 3 (RGB) or None (grayscale if every image is, else RGB).
    Unreadable images are skipped with a warning naming them; a folder without any
    readable image raises DataError. `cache=False` neither reads nor writes the cache.
    """
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels={channels!r} is not supported; use 1 (gray), 3 (RGB) or None (auto)")
    if image_size < 1:
        raise ConfigError(f"image_size={image_size} must be a positive number of pixels")
    root = Path(root).expanduser()
    files, class_names = list_images(root)
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg images found in {root}; put your images there "
                        "(optionally in one sub-folder per class)")
    cache_file = cache_dir("folders") / f"{_cache_key(root, files, image_size, channels)}.safetensors"
    hit = _read_cache(cache_file) if cache else None
    if hit is not None:
        images, labels, class_names, skipped = hit
    else:
        arr, kept, skipped = _decode_all(root, files, image_size, channels)
        images = torch.from_numpy(arr)
        labels = None
        if class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            labels = torch.tensor([index[files[i].parts[0]] for i in kept], dtype=torch.int64)
        if cache and len(images):
            _write_cache(cache_file, images, labels, class_names, skipped)
    for path, reason in skipped:
        warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=2)
    if not len(images):
        raise DataError(f"none of the {len(files)} images in {root} could be read; check that they are "
                        "valid PNG or JPEG files")
    return images, labels, class_names


def image_folder_loaders(root: str | Path, image_size: int, batch_size: int = 64, channels: int | None = None,
                         valid_pct: float = 0.1, seed: int = 0, valid_batch_size: int | None = None,
                         cache: bool = True) -> DataLoaders:
    """Return train/valid loaders of (images float32 [B, C, S, S] in [-1, 1], labels int64 [B] if classes).

    The returned DataLoaders carries `class_names` (a list, or None without class sub-folders).

    A `valid_pct` fraction of the images (at least one when there are two or more),
    chosen by a permutation seeded with `seed`, is held out for validation; the
    same folder and seed always give the same split.
    """
    if not 0 <= valid_pct < 1:
        raise ConfigError(f"valid_pct={valid_pct} must be in [0, 1)")
    images, labels, class_names = load_image_folder(root, image_size, channels, cache)
    n = len(images)
    n_valid = min(n - 1, max(1, round(n * valid_pct))) if valid_pct > 0 and n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tensors = (images,) if labels is None else (images, labels)
    valid = tuple(t[perm[:n_valid]] for t in tensors)
    train = tuple(t[perm[n_valid:]] for t in tensors)
    dls = uint8_loaders(train, valid, batch_size, seed=seed, valid_batch_size=valid_batch_size)
    dls.class_names = class_names  # None without class sub-folders
    return dls

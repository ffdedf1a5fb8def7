"""Train on your own images: a folder of PNG/JPEG files, decoded once and cached; Tiny ImageNet's layout.

Layout: `root/<class>/**/*.png` gives one class per sub-folder (names sorted);
images directly in `root` (and no class sub-folders) give an unlabelled set.
Every image is centre-cropped to a square and resized with Lanczos to
`image_size`, as grayscale ("L") or RGB. `load_image_folder` caches the decoded
uint8 tensor in `$XDG_CACHE_HOME/minidiffusion/folders/<key>.safetensors`, where
the key hashes the sorted relative paths, sizes and modification times of the
files plus the decode settings, so a second load skips decoding and any changed
file re-decodes.

Large labelled sets (`load_class_folder`, `load_tiny_imagenet`) go through
`decode_cached` instead: the images are decoded straight into a `.npy` file in the
cache (beside a `.json` listing which files it holds), and a set bigger than
`MEMMAP_BYTES` comes back memory-mapped from it (numpy copy-on-write memmap), so
100,000 Tiny ImageNet images (1.2 GB) never need to fit in memory at once.
Tiny ImageNet's own layout is read as published: `wnids.txt` (the class order),
`words.txt` (their human names), `train/<wnid>/images/*.JPEG`, and `val/images/`
labelled by `val_annotations.txt`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import check_number
from ..errors import ConfigError, DataError, OutputError
from ..paths import atomic_write, cache_dir, save_safetensors
from .loaders import DataLoaders, uint8_loaders

__all__ = ["IMAGE_SUFFIXES", "MEMMAP_BYTES", "TINY_IMAGENET_URL", "list_images", "load_image_folder",
           "image_folder_loaders", "LabelledImages", "decode_cached", "load_class_folder", "is_tiny_imagenet",
           "load_tiny_imagenet"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
MEMMAP_BYTES = 1 << 30  # decoded sets larger than this (1 GiB) are memory-mapped from the cache
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def list_class_files(root: str | Path, suffixes, what: str, kind: str) -> tuple[list[Path], list[str] | None]:
    """Return (paths relative to `root` of the files whose suffix is in `suffixes`, sorted; class names sorted, or
    None when unlabelled). Files in sub-folders make one class per top-level sub-folder (loose files beside them
    are ignored with a warning); hidden files and folders are ignored. `what` ("image", "sound") and `kind`
    (".png/.jpg images") word the messages."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} folder {root} does not exist or is not a folder; pass the folder holding your {kind}")
    files = sorted(p.relative_to(root) for p in root.rglob("*")
                   if p.suffix.lower() in suffixes and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    nested = [p for p in files if len(p.parts) > 1]
    if not nested:
        return files, None
    loose = len(files) - len(nested)
    if loose:
        warnings.warn(f"{root}: ignoring {loose} {what} file(s) directly in the folder, since its sub-folders "
                      "are used as classes; move them into a class sub-folder to use them", stacklevel=4)
    return nested, sorted({p.parts[0] for p in nested})


def list_images(root: str | Path) -> tuple[list[Path], list[str] | None]:
    """Return (image paths relative to `root`, sorted; class names sorted, or None when unlabelled)
    (`list_class_files`)."""
    return list_class_files(root, IMAGE_SUFFIXES, "image", ".png/.jpg images")


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


def _cache_key(root: Path, files: Sequence[Path], settings: list) -> str:
    """Hash the decode `settings` (JSON-able) and each file's relative path, size and modification time."""
    h = hashlib.sha256(json.dumps(settings).encode())
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
    key = _cache_key(root, files, [_CACHE_VERSION, image_size, channels])
    cache_file = cache_dir("folders") / f"{key}.safetensors"
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


# ---- large labelled sets: decoded once into a .npy cache, memory-mapped when large -------------------------


@dataclass
class LabelledImages:
    """A labelled image set: `images` uint8 [N, C, S, S] in 0..255 (memory-mapped from the cache when large),
    `labels` int64 [N] indexing `class_names`, `files` the source of each image (paths relative to the set's
    folder) and `descriptions` a human name per class (Tiny ImageNet's words.txt; else the class names)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    files: list[str]
    descriptions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> LabelledImages:
        """Return the images at `index` (int64 [M]) with the same classes; the images are copied into memory."""
        return LabelledImages(self.images[index], self.labels[index], self.class_names,
                              [self.files[i] for i in index.tolist()], self.descriptions)

    def counts(self) -> dict[str, int]:
        """Return {class name: number of images}, in class order."""
        n = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, n, strict=True))


def _decode_into(out: np.ndarray, root: Path, files: Sequence[Path], decode: Callable[[Path], np.ndarray | None]
                 ) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode each file into the next free row of `out`; return (indices kept, [(path, reason) unreadable]).

    `decode` returns uint8 [C, S, S], or None to leave a readable file out on purpose (no warning).
    """
    kept, skipped = [], []
    for i, rel in enumerate(files):
        path = root / rel
        try:
            arr = decode(path)
        except Exception as e:  # Pillow raises many types for broken files (OSError, SyntaxError, ...)
            skipped.append((str(path), f"{type(e).__name__}: {e}"))
            continue
        if arr is not None:
            out[len(kept)] = arr
            kept.append(i)
    return kept, skipped


def _read_array_cache(path: Path, shape: tuple[int, ...], mmap: bool
                      ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]] | None:
    """Return a cached (uint8 [M, *shape], kept, skipped), or None if absent, incomplete or unreadable."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        arr = np.load(path, mmap_mode="c" if mmap else None)  # "c": writable pages stay private
        kept = meta["kept"]
        if arr.dtype != np.uint8 or tuple(arr.shape[1:]) != tuple(shape) or len(arr) < len(kept):
            return None
        return arr[: len(kept)], kept, [tuple(s) for s in meta["skipped"]]
    except Exception:  # a missing or damaged cache is a cache miss; it is rewritten
        return None


def _write_json(path: Path, kept: list[int], skipped: list) -> None:
    with atomic_write(path) as tmp:  # written after the .npy: its presence marks the entry complete
        tmp.write_text(json.dumps({"kept": kept, "skipped": skipped}))


def decode_cached(root: Path, files: Sequence[Path], settings: list, decode: Callable[[Path], np.ndarray | None],
                  shape: tuple[int, int, int], kind: str = "folders", cache: bool = True, mmap: bool | None = None
                  ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Return (uint8 [M, C, S, S] of the files that decoded, their indices into `files`, [(path, reason)] unreadable).

    `decode(root / file)` gives one uint8 [C, S, S] = `shape` (None leaves the file out). The result is cached
    in `$XDG_CACHE_HOME/minidiffusion/<kind>/<key>.npy`, the key hashing `settings` and every file's path, size
    and modification time. `mmap` (default: when the set is larger than MEMMAP_BYTES) memory-maps the cached
    array instead of reading it, decoding straight into the file; `cache=False` decodes into memory and writes
    nothing. Unreadable files are returned, not warned about: the caller names them.
    """
    root = Path(root)
    use_mmap = cache and (len(files) * math.prod(shape) > MEMMAP_BYTES if mmap is None else mmap)
    path = cache_dir(kind) / f"{_cache_key(root, files, settings)}.npy"
    if cache and (hit := _read_array_cache(path, shape, use_mmap)) is not None:
        arr, kept, skipped = hit
        return torch.from_numpy(arr), kept, skipped
    if use_mmap:
        try:
            with atomic_write(path) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
                kept, skipped = _decode_into(out, root, files, decode)
                out.flush()
                del out
            _write_json(path.with_suffix(".json"), kept, skipped)
            if (hit := _read_array_cache(path, shape, True)) is not None:
                return torch.from_numpy(hit[0]), kept, skipped
        except OutputError as e:
            warnings.warn(f"could not write the image cache ({e}); decoding into memory instead", stacklevel=3)
    arr = np.empty((len(files), *shape), np.uint8)
    kept, skipped = _decode_into(arr, root, files, decode)
    arr = arr[: len(kept)]
    if cache and not use_mmap:
        try:
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                np.save(f, arr)
            _write_json(path.with_suffix(".json"), kept, skipped)
        except OutputError as e:
            warnings.warn(f"could not write the image cache ({e}); the images will be decoded again next time",
                          stacklevel=3)
    return torch.from_numpy(arr), kept, skipped


def _decode_chw(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Return one image as uint8 [C, S, S]: centre square, Lanczos-resized (see `_decode`)."""
    arr = _decode(path, image_size, gray=channels == 1)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _labelled(root: Path, files: list[Path], labels: list[int], class_names: list[str], descriptions: list[str],
              image_size: int, channels: int, cache: bool, mmap: bool | None, what: str) -> LabelledImages:
    """Decode `files` (relative to `root`, labelled `labels`) through the cache into a LabelledImages."""
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels!r} is not supported here; use 1 (gray) or 3 (RGB)")
    check_number("image_size", image_size, lo=1, hi=4096, integer=True)
    settings = [_CACHE_VERSION, "labelled", image_size, channels]
    images, kept, skipped = decode_cached(root, files, settings, lambda p: _decode_chw(p, image_size, channels),
                                          (channels, image_size, image_size), cache=cache, mmap=mmap)
    for path, reason in skipped:
        warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=3)
    if not kept:
        raise DataError(f"none of the {len(files)} images of {what} could be read; check that they are valid "
                        "PNG or JPEG files")
    return LabelledImages(images, torch.tensor([labels[i] for i in kept], dtype=torch.int64), class_names,
                          [files[i].as_posix() for i in kept], descriptions)


def load_class_folder(root: str | Path, image_size: int = 64, channels: int = 3, cache: bool = True,
                      mmap: bool | None = None) -> LabelledImages:
    """Return the images of `root/<class>/**/*` as LabelledImages of uint8 [N, C, S, S] in 0..255.

    One class per sub-folder (sorted names), as `list_images`. The decoded set is cached (`decode_cached`) and
    memory-mapped when larger than MEMMAP_BYTES (or when `mmap=True`), so sets larger than memory work.
    """
    root = Path(root).expanduser()
    files, class_names = list_images(root)
    if class_names is None:
        raise DataError(f"{root} has no class sub-folders; put the images of each class in root/<class>/")
    index = {name: i for i, name in enumerate(class_names)}
    return _labelled(root, files, [index[f.parts[0]] for f in files], class_names, list(class_names),
                     image_size, channels, cache, mmap, str(root))


# ---- Tiny ImageNet: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt -------


def is_tiny_imagenet(path: str | Path) -> bool:
    """True if `path` looks like a Tiny ImageNet folder: it holds wnids.txt, or is named tiny-imagenet*."""
    path = Path(path).expanduser()
    return (path / "wnids.txt").is_file() or path.name.lower().startswith("tiny-imagenet")


def _read_lines(path: Path, root: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{root} is not a complete Tiny ImageNet folder: {path.relative_to(root)} is missing; "
                        f"download {TINY_IMAGENET_URL}, unzip it and pass data= the tiny-imagenet-200 folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); unzip tiny-imagenet-200.zip again") from None


def load_tiny_imagenet(root: str | Path, image_size: int = 64, cache: bool = True, mmap: bool | None = None
                       ) -> tuple[LabelledImages, LabelledImages]:
    """Return (train, val) LabelledImages of Tiny ImageNet: uint8 [N, 3, S, S] in 0..255 (100,000 / 10,000).

    Labels index `class_names` = the wnids in `wnids.txt` order ("n01443537"); `descriptions` are their names
    from words.txt ("goldfish, Carassius auratus"). Train images are `train/<wnid>/images/*.JPEG`, validation
    images `val/images/*` labelled by `val_annotations.txt`; the unlabelled test split is not read.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Tiny ImageNet folder {root} does not exist; download {TINY_IMAGENET_URL}, unzip it and "
                        "pass data= the tiny-imagenet-200 folder")
    wnids = _read_lines(root / "wnids.txt", root)
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{root / 'wnids.txt'} lists a class twice; unzip tiny-imagenet-200.zip again")
    words = dict(line.split("\t", 1) for line in _read_lines(root / "words.txt", root) if "\t" in line)
    if missing := [w for w in wnids if w not in words]:
        raise DataError(f"{root / 'words.txt'} has no name for {len(missing)} class(es) of wnids.txt (e.g. "
                        f"{missing[0]}); unzip tiny-imagenet-200.zip again")
    names = [words[w].strip() for w in wnids]
    index = {w: i for i, w in enumerate(wnids)}
    train_files = []
    for w in wnids:
        found = sorted(p.relative_to(root) for p in (root / "train" / w / "images").glob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{root} has no training images for class {w} (train/{w}/images/ is empty or missing); "
                            "unzip tiny-imagenet-200.zip again")
        train_files += found
    val_files, val_labels = [], []
    for line in _read_lines(root / "val" / "val_annotations.txt", root):
        name, _, rest = line.partition("\t")
        wnid = rest.split("\t", 1)[0]
        if wnid not in index:
            raise DataError(f"val_annotations.txt labels {name} with {wnid!r}, which wnids.txt does not list; "
                            "unzip tiny-imagenet-200.zip again")
        val_files.append(Path("val", "images", name))
        val_labels.append(index[wnid])
    if missing := [f for f in val_files if not (root / f).is_file()]:
        raise DataError(f"val_annotations.txt lists {len(missing)} image(s) missing from {root / 'val' / 'images'} "
                        f"(e.g. {missing[0].name}); unzip tiny-imagenet-200.zip again")
    train_labels = [index[f.parts[1]] for f in train_files]
    return tuple(_labelled(root, files, labels, wnids, names, image_size, 3, cache, mmap, f"{root} ({split})")
                 for split, files, labels in (("train", train_files, train_labels), ("val", val_files, val_labels)))

"""Photos: random square crops of real photographs, for autoencoder robustness and super-resolution.

The default photographs are the 23 real photos among Debian's desktop wallpapers (packages
`plasma-workspace-wallpapers` and `mate-backgrounds`; the rest of those packages are drawings and
abstract art), picked by name in `PLASMA_PHOTOS` / `MATE_PHOTOS`, the largest resolution of each.
Any folder of your own .png/.jpg photos works too (`root=`). A crop is taken from a photo first
shrunk by a random factor (log-uniform in `scale`, 1.0 = the photo's own pixels), so crops range
from whole-scene views to native-pixel texture. Photos longer than `MAX_SIDE` pixels are
downscaled when decoded (JPEG draft + integer `reduce`), which is fast and gives crisper pixels.

`photo_split` holds out whole source photos, so test crops never share a photo with training crops.
`photo_crops` caches its uint8 tensor in `$XDG_CACHE_HOME/minidiffusion/photos/<key>.safetensors`,
the key hashing the photos' paths, sizes and modification times plus every setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import check_choice, check_number
from ..errors import DataError, OutputError
from ..paths import cache_dir, save_safetensors
from .folders import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["PLASMA_DIR", "MATE_DIR", "PHOTO_FOLDERS", "PLASMA_PHOTOS", "MATE_PHOTOS", "MAX_SIDE", "find_photos",
           "photo_split", "load_photo", "random_crops", "photo_crops"]

PLASMA_DIR = Path("/usr/share/wallpapers")  # apt-get install plasma-workspace-wallpapers
MATE_DIR = Path("/usr/share/backgrounds/mate")  # apt-get install mate-backgrounds
PHOTO_FOLDERS = {"plasma-workspace-wallpapers": PLASMA_DIR, "mate-backgrounds": MATE_DIR}
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "Kite", "OneStandsOut", "Path", "summer_1am")  # wallpaper folders: contents/images/WxH.jpg
MATE_PHOTOS = ("nature/Aqua.jpg", "nature/Blinds.jpg", "nature/Dune.jpg", "nature/FreshFlower.jpg",
               "nature/Garden.jpg", "nature/GreenMeadow.jpg", "nature/LadyBird.jpg", "nature/RainDrops.jpg",
               "nature/Storm.jpg", "nature/TwoWings.jpg", "nature/Wood.jpg", "nature/YellowFlower.jpg")
MAX_SIDE = 2560  # longer photos are downscaled on load
_CACHE_VERSION = 1  # bump when cropping changes, so old caches are not reused
_INSTALL = "apt-get install plasma-workspace-wallpapers mate-backgrounds"


def _largest(folder: Path) -> Path | None:
    """The biggest image in a Plasma wallpaper's contents/images (files are named WxH.ext)."""
    def pixels(p: Path) -> int:
        w, _, h = p.stem.partition("x")
        return int(w) * int(h) if w.isdigit() and h.isdigit() else 0
    files = [p for p in (folder / "contents" / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return max(files, key=lambda p: (pixels(p), p.name)) if files else None


def find_photos(root: str | Path | None = None) -> list[Path]:
    """Return the photo files, sorted: every .png/.jpg under `root` (hidden ones ignored), or by default
    the photographs of the two Debian wallpaper packages that are installed."""
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"photo folder {root} does not exist or is not a folder; pass a folder of .jpg/.png photos")
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not found:
            raise DataError(f"no .png/.jpg/.jpeg photos found in {root}; put your photos there")
        return found
    plasma = [_largest(PLASMA_DIR / name) for name in PLASMA_PHOTOS]
    mate = [MATE_DIR / name for name in MATE_PHOTOS]
    found = sorted(p for p in plasma + mate if p is not None and p.is_file())
    if not found:
        raise DataError(f"no photographs found in {PLASMA_DIR} or {MATE_DIR}; install them with `{_INSTALL}` "
                        "or pass root= a folder of your own photos")
    return found


def photo_split(paths: list[Path], test_pct: float = 0.2, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Return (train photos, test photos), each sorted: a `test_pct` fraction of whole photos (at least one),
    chosen by a permutation of the sorted paths seeded with `seed`."""
    check_number("test_pct", test_pct, lo=0, hi=1, lo_open=True, hi_open=True)
    paths = sorted(Path(p) for p in paths)
    if len(paths) < 2:
        raise DataError(f"holding out a test photo needs at least 2 photos, got {len(paths)}; add photos or use "
                        "split='all'")
    n_test = min(len(paths) - 1, max(1, round(len(paths) * test_pct)))
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    test = set(order[:n_test])
    return [p for i, p in enumerate(paths) if i not in test], [p for i, p in enumerate(paths) if i in test]


def load_photo(path: str | Path, max_side: int = MAX_SIDE) -> PILImage:
    """Return the photo as an RGB PIL image, upright (EXIF), its longer side at most about `max_side`."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4, 1/8 size when that is enough
            img = ImageOps.exif_transpose(img).convert("RGB")
    except Exception as e:  # Pillow raises many types for broken files (OSError, SyntaxError, ...)
        raise DataError(f"cannot read the photo {path} ({type(e).__name__}: {e}); remove or replace it") from None
    factor = math.ceil(max(img.size) / max_side)
    return img.reduce(factor) if factor > 1 else img


def _crops_of(img: PILImage, size: int, zoom: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """uint8 [k, size, size, 3]: for each crop, a square of about `size / zoom` photo pixels (at most the photo's
    shorter side) at relative position (fx, fy) in [0, 1)."""
    from PIL import Image

    w, h = img.size
    out = np.empty((len(zoom), size, size, 3), np.uint8)
    for i, (z, x, y) in enumerate(zip(zoom, fx, fy, strict=True)):
        side = min(round(size / z), w, h)  # whole pixels: at zoom 1 a crop is the photo's own pixels
        x0, y0 = int(x * (w - side + 1)), int(y * (h - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=2.0))
    return out


def random_crops(paths: list[Path], n: int, size: int = 64, seed: int = 0, scale: tuple[float, float] = (0.05, 1.0)
                 ) -> torch.Tensor:
    """Return `n` random crops as uint8 [n, 3, size, size] in 0..255, spread evenly over `paths`.

    Each crop comes from its photo shrunk by a factor log-uniform in `scale` (1.0: the photo's own pixels;
    never so small that the photo is narrower than `size`), at a uniform random position. Every photo is
    decoded once; the same paths, n, size, scale and seed always give the same crops.
    """
    check_number("n", n, lo=0, integer=True)
    check_number("size", size, lo=1, hi=4096, integer=True)
    lo, hi = scale
    check_number("scale[0]", lo, lo=0, hi=hi, lo_open=True)
    check_number("scale[1]", hi, lo=lo, hi=1)
    if not paths:
        raise DataError(f"random_crops got no photos; install them with `{_INSTALL}` or pass your own")
    rng = np.random.default_rng(seed)
    photo = rng.permutation(np.arange(n) % len(paths))
    zoom = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
    fx, fy = rng.random(n), rng.random(n)
    out = np.empty((n, size, size, 3), np.uint8)
    for k, path in enumerate(paths):
        idx = np.flatnonzero(photo == k)
        if len(idx):
            out[idx] = _crops_of(load_photo(path), size, zoom[idx], fx[idx], fy[idx])
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def _cache_key(paths: list[Path], settings: list) -> str:
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, *settings]).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve().as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def photo_crops(split: str = "train", n: int = 4096, size: int = 64, seed: int = 0, root: str | Path | None = None,
                cache: bool = True, scale: tuple[float, float] = (0.05, 1.0), test_pct: float = 0.2,
                split_seed: int = 0) -> torch.Tensor:
    """Return `n` random crops of the photos of `split` ('train', 'test' or 'all') as uint8 [n, 3, size, size].

    The photos are `find_photos(root)`, split by `photo_split(test_pct, split_seed)`; the crops are
    `random_crops(..., seed, scale)`. `cache=False` neither reads nor writes the cache.
    """
    from safetensors.torch import load_file

    check_choice("split", split, ("train", "test", "all"))
    paths = find_photos(root)
    if split != "all":
        paths = photo_split(paths, test_pct, split_seed)[split == "test"]
    settings = [split, n, size, seed, list(scale), test_pct, split_seed]
    path = cache_dir("photos") / f"{_cache_key(paths, settings)}.safetensors"
    if cache and path.is_file():
        try:
            return load_file(str(path))["images"]
        except Exception:  # a damaged cache is a cache miss; it is rewritten below
            pass
    images = random_crops(paths, n, size, seed, scale)
    if cache:
        try:
            save_safetensors({"images": images}, path, metadata={"photos": json.dumps([str(p) for p in paths])})
        except OutputError as e:
            warnings.warn(f"could not write the photo crop cache ({e}); they will be cropped again next time",
                          stacklevel=2)
    return images

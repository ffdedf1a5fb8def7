"""Sprites: about 5,700 real colour images in 20 classes, the unit sprites of Debian's Battle for Wesnoth.

Every unit sprite under `SPRITE_ROOT/<race>/**/*.png` (package `wesnoth-1.16-data`) is one image, its race
folder (drakes, dwarves, undead, ...) its class. Base sprites and their animation frames (attack, defend,
idle, die, facing north) are all kept: they are different poses drawn by hand. Left out are layer pieces
(names with "shadow" or "overlay") and effect frames with fewer than `MIN_OPAQUE` opaque pixels (flames,
glows, the last frames of a fade-out), and classes with fewer than `MIN_IMAGES` sprites (`transport`: 4
boats). Each RGBA sprite (72x72 mostly, up to 200 px for big monsters) is composited on a fixed neutral
grey `BACKGROUND` (0 in [-1, 1]: what zero-padding and rotation fill blend into), centred on a square of it
and resized with Lanczos to `image_size`.

The train/test split holds out whole *units*: a base sprite ("troll-hero.png") and all its frames
("troll-hero-attack-ne-2.png", "troll-hero+female.png") fall on the same side, since frames of one unit are
near copies. Per class, units are taken in a permutation seeded with `split_seed` until at least `test_pct`
of the class's sprites are held out, never holding out more than half of a class. The decoded set is cached
(`folders.decode_cached`) in `$XDG_CACHE_HOME/minidiffusion/sprites/`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import check_choice, check_number
from ..errors import ConfigError, DataError
from .folders import LabelledImages, decode_cached

__all__ = ["SPRITE_ROOT", "BACKGROUND", "MIN_IMAGES", "MIN_OPAQUE", "INSTALL", "find_sprites", "sprite_units",
           "decode_sprite", "load_sprites", "sprite_split"]

SPRITE_ROOT = Path("/usr/share/games/wesnoth/1.16/data/core/images/units")  # apt-get install wesnoth-1.16-data
INSTALL = "apt-get install wesnoth-1.16-data"
BACKGROUND = (128, 128, 128)  # neutral grey, ~0 in [-1, 1]
MIN_IMAGES = 20  # classes with fewer sprites are dropped (only `transport`, 4 boats)
MIN_OPAQUE = 100  # sprites with fewer pixels of alpha >= 128 are effects (flames, glows), not units
_SKIP_WORDS = ("shadow", "overlay")  # layer pieces drawn under or over a unit, not a unit
_SEP = re.compile(r"[-_+]")
_FRAME = re.compile(r"[-_+]?\d+$")  # a frame number ending a name: "-4", "_12", "2"
_CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused


def find_sprites(root: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """Return (sprite paths relative to `root`, sorted; the class of each: its top-level race folder).

    Only files in a race folder count (not `random-dice.png` beside them); layer pieces are left out.
    """
    root = Path(root) if root is not None else SPRITE_ROOT
    if not root.is_dir():
        raise DataError(f"the Wesnoth unit sprites are not in {root}; install them with `{INSTALL}`")
    files = sorted(p.relative_to(root) for p in root.rglob("*.png") if p.is_file())
    files = [f for f in files if len(f.parts) > 1 and not any(w in f.stem for w in _SKIP_WORDS)]
    if not files:
        raise DataError(f"{root} holds no unit sprites (<race>/*.png); install them with `{INSTALL}`")
    return files, [f.parts[0] for f in files]


def sprite_units(files: list[Path]) -> list[str]:
    """Return the unit of each sprite, "<folder>/<base>": frame numbers are dropped from the name, and <base> is
    the shortest such name in the same folder that it starts with, up to a '-', '_' or '+'
    ("troll-hero-attack-ne-2" -> "troll-hero"; "elder-wose-die-decay-1" -> "elder-wose-die-decay").

    Variants named after their unit ("wose-elder", "zombie-wolf") fall in with it: the grouping errs towards
    bigger units, so a held-out unit shares no frames with the training set.
    """
    stems = [_FRAME.sub("", f.stem) or f.stem for f in files]
    by_dir: dict[Path, set[str]] = {}
    for f, stem in zip(files, stems, strict=True):
        by_dir.setdefault(f.parent, set()).add(stem)
    bases: dict[Path, list[str]] = {}
    for folder, names in by_dir.items():
        found: list[str] = []
        for stem in sorted(names, key=lambda s: (len(s), s)):  # shorter names first: they are the bases
            if not any(_derived(stem, b) for b in found):
                found.append(stem)
        bases[folder] = found
    return [f"{f.parent.as_posix()}/{next(b for b in bases[f.parent] if _derived(stem, b))}"
            for f, stem in zip(files, stems, strict=True)]


def _derived(stem: str, base: str) -> bool:
    return stem == base or (stem.startswith(base) and bool(_SEP.match(stem, len(base))))


def decode_sprite(path: Path, image_size: int = 64, background: tuple[int, int, int] = BACKGROUND
                  ) -> np.ndarray | None:
    """Return one sprite as uint8 RGB [3, S, S] in 0..255 (centred on a `background` square, Lanczos-resized),
    or None for an effect frame (fewer than MIN_OPAQUE opaque pixels)."""
    from PIL import Image

    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    if int((np.asarray(rgba)[..., 3] >= 128).sum()) < MIN_OPAQUE:
        return None
    side = max(rgba.size)
    square = Image.new("RGBA", (side, side), (*background, 255))
    square.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    rgb = square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(rgb).transpose(2, 0, 1)


def sprite_split(labels: torch.Tensor, units: list[str], test_pct: float = 0.1, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train indices, test indices), int64 sorted: per class, whole units taken in a permutation seeded
    with `seed` are held out until at least `test_pct` of that class is. A unit holding more than half of its
    class is never held out, so every class keeps at least half of its sprites for training."""
    check_number("test_pct", test_pct, lo=0, hi=1, hi_open=True)
    g = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten().tolist()
        size: dict[str, int] = {}
        for i in members:
            size[units[i]] = size.get(units[i], 0) + 1
        class_units = sorted(size)
        held, taken = 0, set()
        for j in torch.randperm(len(class_units), generator=g).tolist():
            if held >= test_pct * len(members):
                break
            if held + size[class_units[j]] <= len(members) / 2:
                taken.add(class_units[j])
                held += size[class_units[j]]
        for i in members:
            is_test[i] = units[i] in taken
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def load_sprites(split: str = "train", image_size: int = 64, background: tuple[int, int, int] = BACKGROUND,
                 root: str | Path | None = None, cache: bool = True, test_pct: float = 0.1, split_seed: int = 0
                 ) -> LabelledImages:
    """Return the sprites of `split` ('train', 'test' or 'all') as LabelledImages: uint8 [N, 3, S, S] in 0..255,
    labels int64 [N] indexing `class_names` (the race folders with at least MIN_IMAGES sprites, sorted).

    The split holds out whole units (`sprite_split(test_pct, split_seed)`); the same files and seed always give
    the same split. `cache=False` neither reads nor writes the decoded cache.
    """
    check_choice("split", split, ("train", "test", "all"))
    check_number("image_size", image_size, lo=1, hi=4096, integer=True)
    if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
        raise ConfigError(f"background={background!r} must be three integers 0..255 (R, G, B), e.g. (128, 128, 128)")
    root = Path(root) if root is not None else SPRITE_ROOT
    files, races = find_sprites(root)
    settings = [_CACHE_VERSION, image_size, list(background), MIN_OPAQUE]
    images, kept, skipped = decode_cached(root, files, settings, lambda p: decode_sprite(p, image_size, background),
                                          (3, image_size, image_size), kind="sprites", cache=cache)
    if skipped:
        path, reason = skipped[0]
        raise DataError(f"{len(skipped)} sprite(s) cannot be read (e.g. {path}: {reason}); reinstall them with "
                        f"`apt-get install --reinstall wesnoth-1.16-data`")
    files, races = [files[i] for i in kept], [races[i] for i in kept]
    counts = {r: races.count(r) for r in sorted(set(races))}
    class_names = [r for r, n in counts.items() if n >= MIN_IMAGES]
    index = {r: i for i, r in enumerate(class_names)}
    keep = torch.tensor([r in index for r in races])
    labels = torch.tensor([index.get(r, -1) for r in races], dtype=torch.int64)
    full = LabelledImages(images, labels, class_names, [f.as_posix() for f in files], list(class_names))
    if not keep.all():
        full = full.subset(torch.nonzero(keep).flatten())
    if split == "all":
        return full
    train, test = sprite_split(full.labels, sprite_units([Path(f) for f in full.files]), test_pct, split_seed)
    return full.subset(train if split == "train" else test)

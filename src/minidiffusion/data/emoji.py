"""Emoji: about 3,650 real colour images, rendered offline from Debian's Noto Color Emoji font.

Every *fully-qualified* emoji in Unicode's `emoji-test.txt` (package `unicode-data`) is drawn with
the colour bitmap font `NotoColorEmoji.ttf` (package `fonts-noto-color-emoji`) at its one bitmap
size (109, a 136x128 cell), centred on a square, composited on a plain background and resized with
Lanczos. Flags and ZWJ sequences ("woman technologist") are single glyphs only with Pillow's raqm
layout engine, which is therefore required; an emoji that the font still draws as several glyphs
(a font older than the list) is left out with a warning. Labels are each emoji's group (9 classes,
"Food & Drink"), subgroup (about 100, "food-fruit") and name ("red apple").

The train/test split holds out whole *variant families*: an emoji and all its skin-tone variants
(same code points once U+1F3FB..U+1F3FF are removed, or same name before ":" for "... skin tone"
names) fall on the same side. The rendered uint8 set is cached in
`$XDG_CACHE_HOME/minidiffusion/emoji/<key>.safetensors`, the key hashing the font and list files'
bytes, Pillow's version, the image size and the background.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ..config import check_choice, check_number
from ..errors import ConfigError, DataError, OutputError
from ..paths import cache_dir, save_safetensors, sha256_file
from .loaders import DataLoaders, uint8_loaders

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont

__all__ = ["EMOJI_FONT", "EMOJI_LIST", "FONT_SIZE", "SKIN_TONES", "Emoji", "EmojiSet", "parse_emoji_test",
           "open_emoji_font", "render_glyph", "render_emoji", "variant_families", "emoji_split", "load_emoji",
           "emoji_loaders"]

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # apt-get install fonts-noto-color-emoji
EMOJI_LIST = Path("/usr/share/unicode/emoji/emoji-test.txt")  # apt-get install unicode-data
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # the five Fitzpatrick modifiers
FONT_SIZE = 109  # NotoColorEmoji's only bitmap strike: a 136x128 cell
_CACHE_VERSION = 1  # bump when rendering changes, so old caches are not reused
_LINE = re.compile(r"^([0-9A-Fa-f ]+);\s*([a-z-]+)\s*#\s*\S+\s+(?:E\d+\.\d+\s+)?(.+?)\s*$")
_ZWJ_CHECK = ("1F469 200D 1F4BB", "woman technologist")


class Emoji(NamedTuple):
    """One line of emoji-test.txt: code points as hex ("1F44B 1F3FD"), name, group and subgroup."""

    code: str
    name: str
    group: str
    subgroup: str

    @property
    def chars(self) -> str:
        """The emoji as a Python string."""
        return "".join(chr(int(c, 16)) for c in self.code.split())


def parse_emoji_test(path: str | Path | None = None, status: str = "fully-qualified") -> list[Emoji]:
    """Return the emoji of `status` in an emoji-test.txt (default `EMOJI_LIST`), in file (CLDR) order, each with
    its group and subgroup."""
    path = Path(path) if path is not None else EMOJI_LIST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"emoji list {path} does not exist; install it with `apt-get install unicode-data` "
                        "or pass emoji_list= the path of an emoji-test.txt") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the emoji list {path} ({e}); reinstall it with "
                        "`apt-get install --reinstall unicode-data`") from None
    out, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (m := _LINE.match(line)) and m.group(2) == status:
            out.append(Emoji(" ".join(m.group(1).split()).upper(), m.group(3), group, subgroup))
    if not out:
        raise DataError(f"{path} lists no {status} emoji, so it is not an emoji-test.txt; pass emoji_list= the "
                        "emoji-test.txt of package unicode-data")
    return out


def _check_font_exists(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"emoji font {path} does not exist; install it with `apt-get install fonts-noto-color-emoji` "
                        "or pass font= the path of NotoColorEmoji.ttf")
    return path


def open_emoji_font(font: str | Path | None = None) -> FreeTypeFont:
    """Return the colour emoji font (a PIL FreeTypeFont at the bitmap size, raqm layout), checked to draw
    a ZWJ sequence as one glyph."""
    from PIL import ImageFont, features

    path = _check_font_exists(Path(font) if font is not None else EMOJI_FONT)
    if not features.check("raqm"):
        raise DataError("Pillow's raqm text layout is not available, so flags and ZWJ emoji would split into "
                        "several glyphs; install `apt-get install libfribidi0 libraqm0` (Pillow loads them)")
    try:
        f = ImageFont.truetype(str(path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    except OSError as e:
        raise DataError(f"{path} cannot be opened as a colour emoji font at size {FONT_SIZE} ({e}); pass font= "
                        "the NotoColorEmoji.ttf of package fonts-noto-color-emoji") from None
    code, name = _ZWJ_CHECK
    if not _single_glyph(f, Emoji(code, name, "", "").chars):
        raise DataError(f"{path} draws the ZWJ sequence '{name}' as several glyphs; install the font of "
                        "`apt-get install fonts-noto-color-emoji` and a Pillow with raqm (libfribidi0)")
    return f


def _single_glyph(font: FreeTypeFont, chars: str) -> bool:
    """True if `chars` lays out no wider than one emoji cell (a sequence the font knows)."""
    left, _, right, _ = font.getbbox(chars)
    return right - left <= 1.25 * font.getbbox("\U0001F600")[2]


def render_glyph(chars: str, font: FreeTypeFont) -> np.ndarray:
    """Return the emoji drawn at the font's size on a transparent canvas: uint8 RGBA [H, W, 4] in 0..255
    (one glyph: 136 x 128 for Noto; several glyphs side by side are wider)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(chars)
    img = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((-left, -top), chars, font=font, embedded_color=True)
    return np.asarray(img)


def render_emoji(chars: str, font: FreeTypeFont, image_size: int = 64,
                 background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Return one emoji as uint8 RGB [3, S, S] in 0..255: the glyph centred on a square of `background`,
    Lanczos-resized to `image_size`."""
    from PIL import Image

    glyph = Image.fromarray(render_glyph(chars, font), "RGBA")
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (*background, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    rgb = square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(rgb).transpose(2, 0, 1)


def variant_families(codes: list[str], names: list[str]) -> torch.Tensor:
    """Return int64 [N] family ids: emoji sharing code points without skin tones, or (for '... skin tone'
    names) the name before ':', get one id (numbered in order of first appearance)."""
    parent = list(range(len(codes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, (code, name) in enumerate(zip(codes, names, strict=True)):
        bare = " ".join(c for c in code.split() if int(c, 16) not in SKIN_TONES)
        for key in (("code", bare), ("name", name.split(":")[0] if "skin tone" in name else name)):
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    ids: dict[int, int] = {}
    return torch.tensor([ids.setdefault(root(i), len(ids)) for i in range(len(codes))], dtype=torch.int64)


def emoji_split(codes: list[str], names: list[str], test_pct: float = 0.1, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (train indices, test indices), int64 sorted: whole variant families, chosen by a permutation
    seeded with `seed`, are held out until at least `test_pct` of the emoji are."""
    check_number("test_pct", test_pct, lo=0, hi=1, hi_open=True)
    fam = variant_families(codes, names)
    n_fam = int(fam.max()) + 1 if len(fam) else 0
    sizes = torch.bincount(fam, minlength=n_fam)
    order = torch.randperm(n_fam, generator=torch.Generator().manual_seed(seed))
    held = torch.cumsum(sizes[order], 0)  # emoji held out after taking each family in turn
    n_test = int((held < test_pct * len(fam)).sum()) + 1 if test_pct > 0 else 0
    is_test = torch.zeros(n_fam, dtype=torch.bool)
    is_test[order[:n_test]] = True
    test = is_test[fam]
    return torch.nonzero(~test).flatten(), torch.nonzero(test).flatten()


@dataclass
class EmojiSet:
    """Rendered emoji: `images` uint8 [N, 3, S, S] in 0..255 and, per image, its code points, name, group and
    subgroup; `group_names` / `subgroup_names` are the classes of the whole list (file order)."""

    images: torch.Tensor
    codes: list[str]
    names: list[str]
    groups: list[str]
    subgroups: list[str]
    group_names: list[str]
    subgroup_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, kind: str = "group") -> torch.Tensor:
        """Return int64 [N] class indices into `group_names` or `subgroup_names` (`kind` 'group'/'subgroup')."""
        check_choice("kind", kind, ("group", "subgroup"))
        classes, values = (self.group_names, self.groups) if kind == "group" else (self.subgroup_names, self.subgroups)
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index[v] for v in values], dtype=torch.int64)

    def subset(self, index: torch.Tensor) -> EmojiSet:
        """Return the emoji at `index` (int64 [M]) as a new EmojiSet with the same class lists."""
        idx = index.tolist()
        lists = [[xs[i] for i in idx] for xs in (self.codes, self.names, self.groups, self.subgroups)]
        return EmojiSet(self.images[index], *lists, self.group_names, self.subgroup_names)

    def split(self, test_pct: float = 0.1, seed: int = 0) -> tuple[EmojiSet, EmojiSet]:
        """Return (train, test) EmojiSets holding out whole variant families (see `emoji_split`)."""
        train, test = emoji_split(self.codes, self.names, test_pct, seed)
        return self.subset(train), self.subset(test)


def _render_all(emoji: list[Emoji], font: FreeTypeFont, image_size: int, background: tuple[int, int, int]
                ) -> tuple[np.ndarray, list[Emoji], list[Emoji]]:
    """Return (uint8 [N, 3, S, S], the emoji rendered, the emoji left out as several glyphs)."""
    single = [_single_glyph(font, e.chars) for e in emoji]
    kept = [e for e, ok in zip(emoji, single, strict=True) if ok]
    dropped = [e for e, ok in zip(emoji, single, strict=True) if not ok]
    out = np.empty((len(kept), 3, image_size, image_size), np.uint8)
    for i, e in enumerate(kept):
        out[i] = render_emoji(e.chars, font, image_size, background)
    return out, kept, dropped


def _load_all(image_size: int, background: tuple[int, int, int], font: Path, emoji_list: Path,
              cache: bool) -> tuple[EmojiSet, list[str]]:
    """Return (the whole rendered set, names left out), from the cache when it holds this key."""
    from PIL import __version__ as pil_version
    from safetensors import safe_open

    _check_font_exists(font)  # before hashing it, for the sentence
    all_emoji = parse_emoji_test(emoji_list)
    settings = [_CACHE_VERSION, image_size, list(background), sha256_file(font), sha256_file(emoji_list), pil_version]
    path = cache_dir("emoji") / f"{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]}.safetensors"
    if cache and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["emoji"])
                return EmojiSet(f.get_tensor("images"), **meta["set"]), meta["dropped"]
        except Exception:  # a damaged cache is a cache miss; it is rewritten below
            pass
    arr, kept, dropped = _render_all(all_emoji, open_emoji_font(font), image_size, background)
    cols = {k: [getattr(e, k) for e in kept] for k in ("code", "name", "group", "subgroup")}
    meta = {"codes": cols["code"], "names": cols["name"], "groups": cols["group"], "subgroups": cols["subgroup"],
            "group_names": list(dict.fromkeys(e.group for e in all_emoji)),
            "subgroup_names": list(dict.fromkeys(e.subgroup for e in all_emoji))}
    result = EmojiSet(torch.from_numpy(arr), **meta)
    if cache:
        try:
            blob = json.dumps({"set": meta, "dropped": [e.name for e in dropped]})
            save_safetensors({"images": result.images}, path, metadata={"emoji": blob})
        except OutputError as e:
            warnings.warn(f"could not write the emoji cache ({e}); they will be rendered again next time",
                          stacklevel=3)
    return result, [e.name for e in dropped]


def load_emoji(split: str = "train", image_size: int = 64, background: tuple[int, int, int] = (255, 255, 255),
               font: str | Path | None = None, emoji_list: str | Path | None = None, cache: bool = True,
               test_pct: float = 0.1, split_seed: int = 0) -> EmojiSet:
    """Return the emoji of `split` ('train', 'test' or 'all') as an EmojiSet of uint8 [N, 3, S, S] in 0..255.

    The split holds out whole variant families (`emoji_split(test_pct, split_seed)`); the same list and seed
    always give the same split. `cache=False` neither reads nor writes the rendered cache.
    """
    check_choice("split", split, ("train", "test", "all"))
    check_number("image_size", image_size, lo=1, hi=4096, integer=True)
    if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
        raise ConfigError(f"background={background!r} must be three integers 0..255 (R, G, B), e.g. (255, 255, 255)")
    font = Path(font) if font is not None else EMOJI_FONT
    emoji_list = Path(emoji_list) if emoji_list is not None else EMOJI_LIST
    full, dropped = _load_all(image_size, tuple(background), font, emoji_list, cache)
    if dropped:
        warnings.warn(f"{len(dropped)} emoji (e.g. '{dropped[0]}') are not single glyphs in {font} and were left "
                      "out; a newer fonts-noto-color-emoji draws them", stacklevel=2)
    if split == "all":
        return full
    train, test = full.split(test_pct, split_seed)
    return train if split == "train" else test


def emoji_loaders(batch_size: int = 64, image_size: int = 64, label: str | None = "group", seed: int = 0,
                  background: tuple[int, int, int] = (255, 255, 255), font: str | Path | None = None,
                  emoji_list: str | Path | None = None, cache: bool = True, test_pct: float = 0.1,
                  split_seed: int = 0, valid_batch_size: int | None = None) -> DataLoaders:
    """Return train/valid loaders of (images float32 [B, 3, S, S] in [-1, 1], labels int64 [B] unless label=None).

    `label` is 'group', 'subgroup' or None; the valid loader is the held-out test split. The returned
    DataLoaders carries `class_names` (the label's classes, or None).
    """
    check_choice("label", label, ("group", "subgroup", None))
    full = load_emoji("all", image_size, background, font, emoji_list, cache)
    sets = full.split(test_pct, split_seed)
    tensors = [(s.images,) if label is None else (s.images, s.labels(label)) for s in sets]
    dls = uint8_loaders(tensors[0], tensors[1], batch_size, seed=seed, valid_batch_size=valid_batch_size)
    dls.class_names = None if label is None else (full.group_names if label == "group" else full.subgroup_names)
    return dls

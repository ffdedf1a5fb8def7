"""The image sets a recipe can name with `data=`: one function that returns a split of any of them.

    fashion-mnist   60,000 / 10,000 grey 32x32 garments, 10 classes (data/fashion_mnist.py)
    emoji           3,287 / 368 colour emoji at `image_size`, labels group (9) or subgroup (99) (data/emoji.py)
    photos          random crops of 23 real photographs at `image_size`, split by photo (data/photos.py)
    instruments     5,000 / 1,000 spectrograms (1x128x128) of single notes, 10 instrument families
                    (data/instruments.py rendered, data/spectrogram.py transformed)
    a folder path   your own PNG/JPEG images, sub-folders as classes (data/folders.py); a folder holding
                    sound files and no images gives their spectrograms instead (data/audio.py)

Each comes back as uint8 images [N, C, S, S] in 0..255 with int64 labels [N] (or None) and class names.
A spectrogram image is `spectrogram.wave_to_image`'s [-1, 1] pixels quantised to 0..255 (round((x + 1) *
127.5), as every image set: 256 levels over the 80 dB range, 0.31 dB a level); `uint8_to_float` gives
[-1, 1] back and `spectrogram.image_to_wave` the sound. Its size is fixed by `SpectrogramConfig()` (128 mel
bands x 128 frames of a 2.032 s clip at 16 kHz), so `image_size` does not apply. The instrument images are
cached in `$XDG_CACHE_HOME/minidiffusion/instruments/images-<key>.safetensors`, the key hashing the rendered
waves' own cache key and the spectrogram settings: a second load neither renders nor transforms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_number
from ..errors import ConfigError, OutputError
from ..paths import cache_dir, save_safetensors

__all__ = ["ImageSet", "load_image_set", "SET_NAMES", "AUDIO_SETS", "INSTRUMENT_CLIPS", "is_audio_folder",
           "waves_to_images"]

SET_NAMES = ("fashion-mnist", "emoji", "photos", "instruments")
AUDIO_SETS = ("instruments",)  # the named sets whose images are spectrograms (sampling writes sound)
INSTRUMENT_CLIPS = {"train": 500, "test": 100}  # clips per family in each split of the instruments set
_IMAGE_CACHE_VERSION = 1  # bump when the wave -> image transform changes, so old caches are not reused
_STFT_BATCH = 250  # clips transformed at a time: the complex STFT of 250 clips is about 130 MB


@dataclass
class ImageSet:
    """One split of an image set: uint8 images [N, C, S, S], int64 labels [N] or None, class names or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.images)


def waves_to_images(waves: torch.Tensor) -> torch.Tensor:
    """Return clips float32 [N, 32512] in [-1, 1] (16 kHz) as spectrogram images uint8 [N, 1, 128, 128] in 0..255.

    `spectrogram.wave_to_image` with the default `SpectrogramConfig()`, in batches, quantised as every image set.
    """
    from .images import float_to_uint8
    from .spectrogram import SpectrogramConfig, wave_to_image

    spec = SpectrogramConfig()
    out = torch.empty((len(waves), 1, spec.n_mels, spec.frames), dtype=torch.uint8)
    for i in range(0, len(waves), _STFT_BATCH):
        out[i: i + _STFT_BATCH] = float_to_uint8(wave_to_image(waves[i: i + _STFT_BATCH]))
    return out


def _instrument_cache(split: str, n_per_class: int) -> Path:
    """The cache file of the instruments' images: keyed by the waves' own cache key (which hashes the sound font,
    FluidSynth's version, the rendering settings and the notes) and the spectrogram settings."""
    from . import instruments as ins
    from .spectrogram import SpectrogramConfig

    notes = ins.draw_notes(split, n_per_class)
    font = ins._check_sound_font(ins.SOUND_FONT)  # the sentence naming the package, before any hashing
    n = round(ins.SECONDS * ins.SAMPLE_RATE)
    waves_key = ins._cache_path(notes, font, ins.SAMPLE_RATE, n, ins._fluidsynth()[1]).stem
    settings = [_IMAGE_CACHE_VERSION, waves_key, dataclasses.asdict(SpectrogramConfig())]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]
    return cache_dir("instruments") / f"images-{key}.safetensors"


def _instrument_images(split: str, n_per_class: int) -> ImageSet:
    """The instruments' `split` as spectrogram images uint8 [10 * n_per_class, 1, 128, 128], from the cache."""
    from safetensors import safe_open

    from .instruments import CLASS_NAMES, load_instruments

    path = _instrument_cache(split, n_per_class)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                images, labels = f.get_tensor("images"), f.get_tensor("labels")
            if images.shape == (10 * n_per_class, 1, 128, 128) and images.dtype == torch.uint8:
                return ImageSet(images, labels, list(CLASS_NAMES))
        except Exception:  # a damaged cache is a cache miss; it is rewritten below
            pass
    waves, labels, names = load_instruments(split, n_per_class)
    images = waves_to_images(waves)
    try:
        save_safetensors({"images": images, "labels": labels}, path)
    except OutputError as e:
        warnings.warn(f"could not write the instrument image cache ({e}); the spectrograms will be computed again "
                      "next time", stacklevel=3)
    return ImageSet(images, labels, names)


def is_audio_folder(name: str | Path) -> bool:
    """True if `name` is a folder holding sound files (data/audio.AUDIO_SUFFIXES) and no images."""
    from .audio import list_audio
    from .folders import list_images

    path = Path(name).expanduser()
    if not path.is_dir():
        return False
    with warnings.catch_warnings():  # list_* warn about loose files; the loader that reads the folder warns once
        warnings.simplefilter("ignore")
        return bool(list_audio(path)[0]) and not list_images(path)[0]


def _audio_folder_images(root: str | Path) -> ImageSet:
    """A folder of sound files as spectrogram images (each file's first 2.032 s at 16 kHz, peak-normalised)."""
    from .audio import load_audio_folder
    from .spectrogram import SpectrogramConfig

    spec = SpectrogramConfig()
    waves, labels, names = load_audio_folder(root, spec.sample_rate, spec.seconds)
    return ImageSet(waves_to_images(waves), labels, names)


def load_image_set(name: str, split: str = "train", image_size: int = 64, label: str | None = "group",
                   n_crops: int = 4096, seed: int = 0, limit: int = 0) -> ImageSet:
    """Return split "train" or "test" of the set `name` (see the module docstring).

    `label` picks the emoji labels (group | subgroup | None); `n_crops` and `seed` the photo crops
    (the test split gets a quarter as many, from its own held-out photos). `limit` > 0 keeps the
    first `limit` images only; the instruments then render and transform only those (their clips come
    interleaved by family, 0..9, 0..9, ..., so a limited set stays balanced, and a larger limit extends
    it). A folder has no test split: "test" is refused there.
    """
    check_number("limit", limit, lo=0, integer=True)
    s = _load(name, split, image_size, label, n_crops, seed, limit)
    if not limit or limit >= len(s):
        return s
    return ImageSet(s.images[:limit], None if s.labels is None else s.labels[:limit], s.class_names)


def _load(name: str, split: str, image_size: int, label: str | None, n_crops: int, seed: int,
          limit: int) -> ImageSet:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be train or test, got {split!r}")
    if name == "instruments":
        per_class = INSTRUMENT_CLIPS[split]
        return _instrument_images(split, min(per_class, -(-limit // 10)) if limit else per_class)
    if name == "fashion-mnist":
        from .fashion_mnist import CLASSES, load_fashion_mnist

        x, y = load_fashion_mnist(split)
        return ImageSet(x, y, list(CLASSES))
    if name == "emoji":
        from .emoji import load_emoji

        e = load_emoji(split, image_size=image_size)
        if label is None:
            return ImageSet(e.images, None, None)
        return ImageSet(e.images, e.labels(label), list(e.group_names if label == "group" else e.subgroup_names))
    if name == "photos":
        from .photos import photo_crops

        n = n_crops if split == "train" else max(1, n_crops // 4)
        return ImageSet(photo_crops(split, n=n, size=image_size, seed=seed), None, None)
    if split == "test":
        raise ConfigError(f"{name} is a folder of images, which has no test split; use data=emoji, photos, "
                          "fashion-mnist or instruments for a held-out evaluation")
    if is_audio_folder(name):
        return _audio_folder_images(name)
    from .folders import load_image_folder

    x, y, names = load_image_folder(name, image_size)
    return ImageSet(x, y, names)

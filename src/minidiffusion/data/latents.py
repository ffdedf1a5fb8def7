"""Latents, encoded once: a memory-mapped float32 array of each image's posterior, read back as a data set.

Lesson 25 encodes the training set with the VAE once and trains the U-Net on the stored latents.
`minidiffusion encode` (pipelines/autoencoder.py) writes a folder:

    latents.f32    np.memmap float32 [N, 2, C, h, w]: the posterior mean and log-variance of each
                   image, UNSCALED, so training can draw a fresh latent each epoch (z = mean + std eps)
    labels.npy     int64 [N, K]: one column per label kind (e.g. group, subgroup), -1 = none
    latents.json   format, shape, dtype, the VAE's scale factor and the SHA-256 of its weights, the
                   data set and split, the label kinds and class names

A folder whose JSON does not match its array (size, shape), or whose VAE hash differs from the VAE a
run names, is refused with a sentence. `LatentLoader` yields (scaled latents float32 [B, C, h, w],
labels int64 [B]) batches, shuffled by seed and epoch like `TensorLoader`, resampling each latent
from its posterior with the global RNG (restored on resume, so `--resume` stays exact).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..paths import atomic_write
from .loaders import DataLoaders, TensorLoader

__all__ = ["FORMAT", "LatentSet", "write_latents", "read_latents", "LatentLoader", "latent_loaders"]

FORMAT = "minidiffusion-latents-1"
ARRAY, LABELS, META = "latents.f32", "labels.npy", "latents.json"


@dataclass
class LatentSet:
    """An encoded data set: posterior (mean, logvar) per image, labels, and what made it."""

    moments: np.ndarray  # float32 [N, 2, C, h, w] (a read-only memmap when read from disk), unscaled
    labels: np.ndarray  # int64 [N, K]
    scale_factor: float
    vae_sha256: str
    meta: dict = field(default_factory=dict)  # data, split, image_size, label_kinds, class_names, ...

    def __len__(self) -> int:
        return len(self.moments)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(self.moments.shape[2:])

    def label_column(self, kind: str | None) -> np.ndarray | None:
        """Return the labels of `kind` (int64 [N]), or None for kind None; ConfigError for an unknown kind."""
        if kind is None:
            return None
        kinds = self.meta.get("label_kinds", [])
        if kind not in kinds:
            raise ConfigError(f"these latents have labels {kinds or 'none'}, not {kind!r}; encode them with those "
                              "labels or choose one of these")
        return self.labels[:, kinds.index(kind)]

    def class_names(self, kind: str | None) -> list[str] | None:
        """Return the class names of label `kind` (None for kind None)."""
        return None if kind is None else list(self.meta.get("class_names", {}).get(kind, []))


def write_latents(folder: str | Path, moments: np.ndarray, labels: np.ndarray, scale_factor: float,
                  vae_sha256: str, **meta) -> Path:
    """Write an encoded set into `folder` (the three files above, each atomically); return the folder.

    `moments` float32 [N, 2, C, h, w] (mean, logvar; unscaled), `labels` int64 [N, K].
    """
    folder = Path(folder)
    moments = np.ascontiguousarray(moments, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).reshape(len(moments), -1)
    if moments.ndim != 5 or moments.shape[1] != 2:
        raise ValueError(f"write_latents: moments must be [N, 2, C, h, w], got {moments.shape}")
    with atomic_write(folder / ARRAY) as tmp:  # written batch by batch into a memmap, flushed, renamed
        mm = np.memmap(tmp, dtype=np.float32, mode="w+", shape=moments.shape)
        for i in range(0, len(moments), 256):
            mm[i: i + 256] = moments[i: i + 256]
        mm.flush()
        del mm
    with atomic_write(folder / LABELS) as tmp, open(tmp, "wb") as f:
        np.save(f, labels, allow_pickle=False)
    info = {"format": FORMAT, "shape": list(moments.shape), "dtype": "float32", "scale_factor": float(scale_factor),
            "vae_sha256": vae_sha256, **meta}
    with atomic_write(folder / META) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    return folder


def read_latents(folder: str | Path, vae_sha256: str | None = None, split: str = "train") -> LatentSet:
    """Open an encoded set read-only (the array stays on disk, memory-mapped); refuse a damaged or foreign one.

    `folder` holds the files, or (as `minidiffusion encode` writes by default) one sub-folder per split,
    of which `split` is read. With `vae_sha256`, the set must have been encoded by that VAE (its
    weights' SHA-256).
    """
    folder = Path(folder)
    if not (folder / META).is_file() and (folder / split / META).is_file():
        folder = folder / split
    meta_path = folder / META
    if not meta_path.is_file():
        raise DataError(f"{folder} holds no encoded latents ({META} is missing); make them with "
                        "`minidiffusion encode VAE_RUN --data emoji --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(int(s) for s in meta["shape"])
        scale, sha = float(meta["scale_factor"]), str(meta["vae_sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path} is damaged ({e}); encode the latents again") from None
    if meta.get("format") != FORMAT or len(shape) != 5 or shape[1] != 2:
        raise DataError(f"{meta_path} is not a {FORMAT} description; encode the latents again")
    expected = int(np.prod(shape)) * 4
    array = folder / ARRAY
    if not array.is_file() or array.stat().st_size != expected:
        size = array.stat().st_size if array.is_file() else 0
        raise DataError(f"{array} holds {size} bytes but {META} describes {expected} ({list(shape)} float32); "
                        "the encoding was cut short or edited: encode the latents again")
    if vae_sha256 is not None and sha != vae_sha256:
        raise ConfigError(f"the latents in {folder} were encoded by another VAE (weights {sha[:12]}...), not the "
                          f"one this run uses ({vae_sha256[:12]}...); encode them with this VAE or name that one")
    try:
        labels = np.load(folder / LABELS, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / LABELS} cannot be read ({e}); encode the latents again") from None
    if labels.ndim != 2 or len(labels) != shape[0]:
        raise DataError(f"{folder / LABELS} has labels for {len(labels)} images, not {shape[0]}; encode again")
    moments = np.memmap(array, dtype=np.float32, mode="r", shape=shape)
    return LatentSet(moments, labels, scale, sha, meta)


class LatentLoader(TensorLoader):
    """Batches of (scaled latents float32 [B, C, h, w], labels int64 [B]) drawn from stored posteriors.

    Each batch draws z = mean + exp(logvar / 2) * eps with the global RNG (`sample=False`: the mean)
    and multiplies by the scale factor, so the U-Net sees unit-variance latents.
    """

    def __init__(self, moments: torch.Tensor, labels: torch.Tensor | None, scale_factor: float,
                 sample: bool = True, **kwargs):
        tensors = (moments,) if labels is None else (moments, labels)
        super().__init__(*tensors, batch_tfm=self._draw, **kwargs)
        self.scale_factor, self.sample = scale_factor, sample

    def _draw(self, batch: tuple) -> tuple:
        m = batch[0]
        mean, logvar = m[:, 0], m[:, 1].clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.sample else mean
        return (z * self.scale_factor, *batch[1:])


def latent_loaders(latents: LatentSet, batch_size: int, label: str | None = None, valid_pct: float = 0.05,
                   seed: int = 0, sample: bool = True) -> DataLoaders:
    """Return train/valid LatentLoaders over an encoded set (a seeded `valid_pct` held out for validation).

    The arrays are read into memory once (a few tens of MB for thousands of small latents).
    """
    moments = torch.from_numpy(np.array(latents.moments))
    col = latents.label_column(label)
    labels = None if col is None else torch.from_numpy(np.array(col))
    n = len(moments)
    n_valid = min(n - 1, max(1, round(n * valid_pct))) if n > 1 and valid_pct > 0 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = []
    for idx in (perm[n_valid:], perm[:n_valid]):
        parts.append((moments[idx], None if labels is None else labels[idx]))
    (tm, tl), (vm, vl) = parts
    train = LatentLoader(tm, tl, latents.scale_factor, sample, batch_size=batch_size, shuffle=True, seed=seed)
    valid = LatentLoader(vm, vl, latents.scale_factor, False, batch_size=2 * batch_size)
    return DataLoaders(train, valid)

"""Batches straight from in-memory tensors: no worker processes, no per-item Python.

Small data sets (Fashion-MNIST: 60,000 x 32 x 32 uint8 = 60 MB) live in memory;
a loader yields slices of them. Shuffling uses a generator seeded with
`seed + epoch`, so the order of any epoch can be recomputed on resume, and
`start_iter` lets a resumed run skip the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .images import uint8_to_float

__all__ = ["TensorLoader", "DataLoaders", "uint8_loaders"]


class TensorLoader:
    """Iterate over aligned tensors in batches; yields a tuple per batch (after `batch_tfm`)."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 64, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0,
                 batch_tfm: Callable[[tuple], tuple] | None = None):
        if not tensors:
            raise ValueError("TensorLoader needs at least one tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(f"TensorLoader tensors disagree in length: {[len(t) for t in tensors]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.n, self.batch_size = tensors, n, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.batch_tfm = batch_tfm
        self.epoch = 0
        self.start_iter = 0  # batches to skip on the next pass only (resume mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle order the next pass uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self) -> torch.Tensor | None:
        """Return this epoch's permutation of item indices, or None when not shuffling."""
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple]:
        idx = self.order()
        start, self.start_iter = self.start_iter, 0
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.n))
            ids = sl if idx is None else idx[sl]
            batch = tuple(t[ids] for t in self.tensors)
            yield self.batch_tfm(batch) if self.batch_tfm else batch


@dataclass
class DataLoaders:
    """A training and a validation loader."""

    train: TensorLoader
    valid: TensorLoader


def _to_float(batch: tuple) -> tuple:
    """Batch transform: first tensor uint8 -> float32 in [-1, 1]; the rest (labels) untouched."""
    return (uint8_to_float(batch[0]), *batch[1:])


def uint8_loaders(train: tuple[torch.Tensor, ...], valid: tuple[torch.Tensor, ...], batch_size: int,
                  seed: int = 0, valid_batch_size: int | None = None) -> DataLoaders:
    """Return DataLoaders over uint8 image tensors (+ labels); batches come out float32 in [-1, 1].

    The training loader shuffles (seeded by `seed` and the epoch); the validation
    loader does not, and uses `valid_batch_size` (default 2 * batch_size).
    """
    return DataLoaders(
        TensorLoader(*train, batch_size=batch_size, shuffle=True, seed=seed, batch_tfm=_to_float),
        TensorLoader(*valid, batch_size=valid_batch_size or 2 * batch_size, batch_tfm=_to_float))

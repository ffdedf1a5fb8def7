"""Shared helpers for the Learner/callback/checkpoint tests: tiny synthetic data and models.

Imported by the other test_learner*/test_callbacks*/test_checkpoint* modules (pytest puts
tests/ on sys.path); it holds no tests of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from minidiffusion.data.loaders import DataLoaders, TensorLoader
from minidiffusion.learner import Callback

TRUE_W = torch.tensor([[2.0], [-1.0], [0.5]])
TRUE_B = 0.3


def regression_dls(n_train: int = 64, n_valid: int = 16, bs: int = 8, seed: int = 0,
                   shuffle: bool = True) -> DataLoaders:
    """Return loaders of y = x @ TRUE_W + TRUE_B + small noise, x ~ N(0, 1) of shape [n, 3]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, 3, generator=g)
    y = x @ TRUE_W + TRUE_B + 0.01 * torch.randn(n_train + n_valid, 1, generator=g)
    return DataLoaders(TensorLoader(x[:n_train], y[:n_train], batch_size=bs, shuffle=shuffle, seed=seed),
                       TensorLoader(x[n_train:], y[n_train:], batch_size=bs))


def mlp(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Return a small 3 -> 16 -> 1 MLP (optionally with dropout), initialised from `seed`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Assert two state dicts have the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})"


class Recorder(Callback):
    """Append `(tag, event)` to a shared list for every event in `events`."""

    def __init__(self, log: list, tag: str = "", order: int = 0,
                 events: tuple[str, ...] = ("before_fit", "after_fit", "before_epoch", "after_epoch",
                                            "before_batch", "after_batch")):
        self.log, self.tag, self.order = log, tag, order
        for name in events:
            setattr(self, name, lambda learn, name=name: self.log.append((self.tag, name)))


class RaiseAt(Callback):
    """Raise `exc` in event `event` when (epoch, iter) == `at` (training phase only)."""

    def __init__(self, event: str, exc: type[Exception], at: tuple[int, int] = (0, 1), order: int = 0):
        self.order = order

        def hook(learn):
            if learn.training and (learn.epoch, learn.iter) == at:
                raise exc()

        setattr(self, event, hook)


class PoisonLoss(Callback):
    """Multiply the training loss by `value` (NaN) at (epoch, iter) == `at`, before NaNGuardCB looks."""

    order = -30

    def __init__(self, at: tuple[int, int] = (0, 1), value: float = float("nan")):
        self.at, self.value = at, value

    def after_loss(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at:
            learn.loss = learn.loss * self.value

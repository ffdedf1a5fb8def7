"""Device placement as a callback: the model and every batch on one device."""

from __future__ import annotations

import torch

from ..device import default_device
from .callback import Callback

__all__ = ["DeviceCB", "to_device"]


def to_device(x, device):
    """Return `x` (a tensor, or tuples/lists/dicts of them) moved to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


class DeviceCB(Callback):
    """Move the model (at fit start) and every batch to `device` (default: cuda > mps > cpu); sets learn.device."""

    order = -10

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()

    def before_fit(self, learn):
        learn.model.to(self.device)
        learn.device = self.device

    def before_batch(self, learn):
        learn.batch = to_device(learn.batch, self.device)

"""Exponential moving average (EMA) of the model's weights, for sampling and evaluation.

After each optimizer step: ema = d * ema + (1 - d) * weights, for every parameter and
floating-point buffer (BatchNorm running statistics); integer buffers are copied. With
`warmup=True` the decay starts low and grows, d_n = min(decay, (1 + n) / (10 + n)) for the
n-th update (n = 0, 1, ...), so early, random weights are forgotten quickly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..artifacts import check_state_dict
from .callback import Callback

__all__ = ["EMACB", "copy_without_hooks", "ema_decay"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


def copy_without_hooks(model: nn.Module) -> nn.Module:
    """Return a deep copy of `model` without its forward/backward hooks (nor what they reference)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(model, memo)


def ema_decay(n: int, decay: float, warmup: bool) -> float:
    """Return the decay (0..1) used by the n-th EMA update (n counts from 0)."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


class EMACB(Callback):
    """Keep `self.ema_model`, an EMA of the model's parameters and buffers, updated after each step.

    `use_for_valid=True` runs the validation phase with the EMA weights. `state_dict()` holds the
    EMA weights and the update count, for checkpoints.
    """

    order = 20
    skip_in_lr_find = True
    state_key = "EMACB"

    def __init__(self, decay: float = 0.999, warmup: bool = True, use_for_valid: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.use_for_valid = decay, warmup, use_for_valid
        self.ema_model: nn.Module | None = None
        self.n_updates, self._source, self._pending, self._swapped = 0, None, None, None

    def before_fit(self, learn) -> None:
        if self.ema_model is None or self._source is not learn.model:
            self.ema_model = copy_without_hooks(learn.model).eval().requires_grad_(False)
            self._source, self.n_updates = learn.model, 0
        self.ema_model.to(next(learn.model.parameters()).device)
        if self._pending is not None:
            self.load_state_dict(self._pending)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the EMA one step towards `model`'s current weights; returns the decay used."""
        d = ema_decay(self.n_updates, self.decay, self.warmup)
        ema, src = self.ema_model.state_dict(), model.state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([ema[k] for k in floats], [src[k].detach() for k in floats], 1.0 - d)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(src[k])
        self.n_updates += 1
        return d

    def after_step(self, learn) -> None:
        self.update(learn.model)

    def before_epoch(self, learn) -> None:
        if self.use_for_valid and not learn.training:
            self._swapped, learn.model = learn.model, self.ema_model

    def cleanup_epoch(self, learn) -> None:
        if self._swapped is not None:
            learn.model, self._swapped = self._swapped, None

    def state_dict(self) -> dict:
        """Return {"ema_updates": count, "model": EMA state dict (tensors)}."""
        if self.ema_model is None:
            return dict(self._pending or {})
        return {"ema_updates": self.n_updates, "model": self.ema_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (applied at the next before_fit if the EMA model does not exist yet)."""
        if self.ema_model is None:
            self._pending = state
            return
        check_state_dict(self.ema_model.state_dict(), state["model"], "the saved EMA")
        self.ema_model.load_state_dict(state["model"])
        self.n_updates, self._pending = state["ema_updates"], None

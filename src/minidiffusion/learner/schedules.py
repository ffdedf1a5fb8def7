"""Learning-rate schedules as callbacks, and the LR range test ("LR finder").

`BatchSchedCB` wraps any torch LR scheduler, built in before_fit from the learner's
optimizer and stepped after every training optimizer step; `OneCycleCB` is the one-cycle
policy (warm up to `max_lr` for `pct_start` of the steps, then cosine-anneal, with
momentum cycled the opposite way). `lr_find` trains briefly with an exponentially
growing LR, records the loss, and puts the weights back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR

from .callback import Callback, CancelFitException
from .plotting import new_figure, save_figure
from .state import capture_rng, restore_rng

__all__ = ["BatchSchedCB", "OneCycleCB", "LRFinderCB", "lr_find", "suggest_lr", "plot_lr_find"]


class BatchSchedCB(Callback):
    """Step the scheduler `sched_func(optimizer)` after every training optimizer step.

    `self.lrs` records the LR (of the first parameter group) each step used; `state_dict()` and
    `load_state_dict()` save the scheduler for checkpoints (a state loaded before fit is applied
    as soon as the scheduler exists).
    """

    order = 30
    skip_in_lr_find = True
    state_key = "BatchSchedCB"

    def __init__(self, sched_func: Callable[[torch.optim.Optimizer], LRScheduler]):
        self.sched_func = sched_func
        self.sched: LRScheduler | None = None
        self._pending: dict | None = None

    def make_sched(self, learn) -> LRScheduler:
        """Return a new scheduler for `learn.opt` (subclasses choose the schedule here)."""
        return self.sched_func(learn.opt)

    def before_fit(self, learn) -> None:
        self.sched, self.lrs = self.make_sched(learn), []
        learn.sched = self.sched
        if self._pending is not None:
            self.sched.load_state_dict(self._pending)
            self._pending = None

    def after_step(self, learn) -> None:
        self.lrs.append(learn.opt.param_groups[0]["lr"])
        self.sched.step()

    def state_dict(self) -> dict:
        """Return the scheduler's state dict (plain numbers and strings)."""
        return self.sched.state_dict() if self.sched is not None else dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        """Restore a scheduler state from `state_dict()`."""
        if self.sched is not None:
            self.sched.load_state_dict(state)
        else:
            self._pending = state


class OneCycleCB(BatchSchedCB):
    """One-cycle LR (torch's OneCycleLR) over `total_steps` (default n_epochs * len(dls.train)) steps.

    Extra keyword arguments go to OneCycleLR (div_factor, final_div_factor, anneal_strategy, ...).
    """

    state_key = "OneCycleCB"

    def __init__(self, max_lr: float | list[float], pct_start: float = 0.25, total_steps: int | None = None,
                 **kwargs):
        super().__init__(partial(OneCycleLR, max_lr=max_lr, pct_start=pct_start, **kwargs))
        self.total_steps, self.pct_start = total_steps, pct_start

    def make_sched(self, learn) -> LRScheduler:
        total = self.total_steps or learn.n_epochs * len(learn.dls.train)
        if float(self.pct_start * total) == 1.0:  # a warm-up of exactly one step divides by zero inside OneCycleLR
            return self.sched_func(learn.opt, total_steps=total, pct_start=min(0.99, 1.5 / total))
        return self.sched_func(learn.opt, total_steps=total)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class LRFinderCB(Callback):
    """Grow the LR from `start_lr` to `end_lr` over `num_iter` training batches, recording the losses.

    Losses are smoothed (debiased exponential average with `beta`; batch-to-batch noise would
    otherwise fake a divergence). Stops early (CancelFitException) after `num_iter` batches or, with
    `stop_div`, once the loss is NaN or the smoothed loss exceeds 4x its minimum. Results: `self.lrs`
    and `self.losses` (smoothed; `self.raw_losses` unsmoothed), one per batch, each measured just
    before the step that uses that LR.
    """

    order = 30

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
                 stop_div: bool = True, beta: float = 0.9):
        if not 0 < start_lr < end_lr or num_iter < 2:
            raise ValueError(f"LRFinderCB needs 0 < start_lr < end_lr and num_iter >= 2, got {start_lr}, "
                             f"{end_lr}, {num_iter}")
        self.start_lr, self.num_iter, self.stop_div, self.beta = start_lr, num_iter, stop_div, beta
        self.mult = (end_lr / start_lr) ** (1 / (num_iter - 1))

    def before_fit(self, learn) -> None:
        self.lrs, self.losses, self.raw_losses, self._avg = [], [], [], 0.0

    def before_batch(self, learn) -> None:
        if learn.training:
            _set_lr(learn.opt, self.start_lr * self.mult ** len(self.lrs))

    def after_loss(self, learn) -> None:
        if not learn.training:
            return
        loss = float(learn.loss.detach())
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        self.lrs.append(learn.opt.param_groups[0]["lr"])
        self.raw_losses.append(loss)
        self.losses.append(self._avg / (1 - self.beta ** len(self.lrs)))
        diverged = not math.isfinite(loss) or self.losses[-1] > 4 * min(self.losses)
        if (self.stop_div and diverged) or len(self.lrs) >= self.num_iter:
            raise CancelFitException()


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """Return a learning rate a tenth of the one with the lowest loss (a safe start for one-cycle)."""
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if not finite:
        raise ValueError("every LR finder loss is NaN/inf: lower start_lr or check the data and model")
    return min(finite)[1] / 10


def plot_lr_find(lrs: list[float], losses: list[float], path: str | Path) -> Path:
    """Write the loss-vs-LR curve (log LR axis) as a PNG; returns the path."""
    fig, ax = new_figure()
    ax = ax[0, 0]
    ax.plot(lrs, losses)
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR finder")
    finite = [v for v in losses if math.isfinite(v)]
    if finite:  # keep the divergence from squashing the useful part of the curve
        low, high = min(finite), min(max(finite), 4 * min(finite))
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.axvline(suggest_lr(lrs, losses), color="tab:red", ls="--", label="suggestion")
        ax.legend()
    return save_figure(fig, path)


def lr_find(learn, start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
            stop_div: bool = True) -> tuple[list[float], list[float]]:
    """Run the LR range test on `learn`; returns (lrs, smoothed losses), one per training batch.

    Callbacks marked `skip_in_lr_find` (schedules, metrics, progress, checkpoints, EMA, activation
    stats) are left out; the model weights, optimizer object and RNG states are restored afterwards.
    Writes `lr_find.png` into `learn.path` when it is set.
    """
    finder = LRFinderCB(start_lr, end_lr, num_iter, stop_div)
    weights = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    saved_cbs, saved_opt, rng = learn.cbs, learn.opt, capture_rng()
    learn.cbs = [cb for cb in saved_cbs if not getattr(cb, "skip_in_lr_find", False)]
    try:
        learn.fit(math.ceil(num_iter / len(learn.dls.train)), valid=False, cbs=[finder])
    finally:
        learn.cbs, learn.opt = saved_cbs, saved_opt
        learn.model.load_state_dict(weights)
        restore_rng(rng)
    if learn.path is not None and finder.lrs:
        plot_lr_find(finder.lrs, finder.losses, learn.path / "lr_find.png")
    return finder.lrs, finder.losses

"""Train for a wall-clock budget: a one-cycle LR schedule over *time* instead of steps.

"Train for M minutes" is how we compare recipes fairly on one machine (both get the same
budget) and how the demo stays inside its time bound. The LR follows the one-cycle shape
as a function of the elapsed fraction of the budget, and training stops when it is spent.
Because the schedule depends on the clock, such a run is not bit-reproducible; use an
epoch-based schedule (OneCycleCB) for that.
"""

from __future__ import annotations

import math
import time

from .callback import Callback, CancelFitException

__all__ = ["one_cycle_lr", "TimeBudgetCB"]


def one_cycle_lr(frac: float, max_lr: float, pct_start: float = 0.25, div: float = 25.0,
                 final_div: float = 1e4) -> float:
    """Return the one-cycle LR at progress `frac` in [0, 1]: cosine warm-up from max_lr/div to max_lr
    over `pct_start`, then cosine annealing down to max_lr/(div*final_div) (torch's OneCycleLR shape)."""
    frac = min(max(frac, 0.0), 1.0)
    start, end = max_lr / div, max_lr / (div * final_div)

    def cos_interp(a: float, b: float, p: float) -> float:
        return b + (a - b) * (1 + math.cos(math.pi * p)) / 2

    if frac < pct_start:
        return cos_interp(start, max_lr, frac / pct_start)
    return cos_interp(max_lr, end, (frac - pct_start) / (1 - pct_start))


class TimeBudgetCB(Callback):
    """Set the LR from `one_cycle_lr(elapsed / budget)` before each training step; stop when spent.

    Only training time counts (validation is excluded), so two recipes given the same budget get
    the same optimisation time. `learn.n_epochs` should be large enough never to end first.
    Records `self.steps` and `self.seconds` for reports; both are saved in checkpoints, so a
    resumed run spends only what is left of the budget, on the same schedule.
    """

    order = -20  # first in before_batch, so device transfer and augmentation count as training time
    state_key = "TimeBudgetCB"

    def __init__(self, minutes: float, max_lr: float, pct_start: float = 0.25, clock=time.perf_counter):
        if minutes <= 0:
            raise ValueError(f"TimeBudgetCB needs minutes > 0, got {minutes}")
        self.budget, self.max_lr, self.pct_start, self.clock = minutes * 60.0, max_lr, pct_start, clock
        self.seconds, self.steps = 0.0, 0

    def before_fit(self, learn) -> None:
        self.seconds, self.steps, self._t0 = 0.0, 0, None

    def before_batch(self, learn) -> None:
        if not learn.training:
            return
        if self.seconds >= self.budget:
            raise CancelFitException()
        self._t0 = self.clock()
        lr = one_cycle_lr(self.seconds / self.budget, self.max_lr, self.pct_start)
        for g in learn.opt.param_groups:
            g["lr"] = lr

    def after_batch(self, learn) -> None:
        if learn.training and self._t0 is not None:
            self.seconds += self.clock() - self._t0
            self.steps += 1
            self._t0 = None

    @property
    def seconds_left(self) -> float:
        """Return the training seconds left in the budget (0 once it is spent)."""
        return max(self.budget - self.seconds, 0.0)

    def state_dict(self) -> dict:
        """Return {"seconds": training seconds spent, "steps": steps taken}, for checkpoints."""
        return {"seconds": self.seconds, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue the budget, and with it the LR schedule, from a checkpoint's `state_dict()`."""
        self.seconds, self.steps = float(state["seconds"]), int(state["steps"])

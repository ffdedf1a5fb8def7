"""What every callback is: the `Callback` base class, the three cancel exceptions, and `run_cbs`.

A callback is any object with an `order` (lower runs first) and some of the Learner's event
methods (`before_fit`, `after_batch`, ... see learner.py); it may also provide one of the working
stages (`predict`, `get_loss`, `backward`, `step`, `zero_grad`). A callback whose state must
survive `--resume` defines `state_dict()` / `load_state_dict()` and a stable `state_key`, the
name its state is saved under in checkpoints (renaming the class must not orphan old runs).
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

__all__ = ["Callback", "CancelFitException", "CancelEpochException", "CancelBatchException", "run_cbs"]


class CancelFitException(Exception):
    """Raise in a callback to end `fit` (after_fit still runs)."""


class CancelEpochException(Exception):
    """Raise in a callback to end the current training or validation phase."""


class CancelBatchException(Exception):
    """Raise in a callback to skip the rest of the current batch."""


class Callback:
    """Base class: override any event method `before_x(learn)` / `after_x(learn)`.

    `order` sorts callbacks (lower first); `state_key`, for callbacks with state, names that state in
    checkpoints (default: the class name, which is what checkpoints of earlier versions used).
    """

    order = 0
    state_key: str | None = None

    def checkpoint_key(self) -> str:
        """Return the name this callback's state is saved under in checkpoints."""
        return self.state_key or type(self).__name__


def run_cbs(cbs: Iterable[Callback], method_name: str, learn=None) -> None:
    """Call `method_name(learn)` on every callback that has it, in increasing `order`."""
    for cb in sorted(cbs, key=attrgetter("order")):
        method = getattr(cb, method_name, None)
        if method is not None:
            method(learn)

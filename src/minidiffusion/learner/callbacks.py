"""The basic callbacks: the default training stages, metrics, batch transforms and
single-batch inspection.

Larger callbacks each have their own module in this package (device, progress, schedules,
precision, ema, checkpoint, time_budget, activations, nan_guard).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runs import append_metrics
from .callback import Callback, CancelFitException

__all__ = ["TrainCB", "MetricsCB", "SingleBatchCB", "BatchTransformCB", "accuracy"]


class TrainCB(Callback):
    """The standard supervised stages: preds = model(*inputs), loss = loss_func(preds, *targets).

    `n_inp` says how many leading batch elements are model inputs (the rest are targets).
    """

    order = 0

    def __init__(self, n_inp: int = 1):
        self.n_inp = n_inp

    def predict(self, learn):
        learn.preds = learn.model(*learn.batch[: self.n_inp])

    def get_loss(self, learn):
        learn.loss = learn.loss_func(learn.preds, *learn.batch[self.n_inp:])

    def backward(self, learn):
        learn.loss.backward()

    def step(self, learn):
        learn.opt.step()

    def zero_grad(self, learn):
        learn.opt.zero_grad(set_to_none=True)


def accuracy(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Return the fraction (0..1) of rows of `preds` [N, C] whose argmax equals `targets` [N]."""
    return (preds.argmax(dim=1) == targets).float().mean().item()


class MetricsCB(Callback):
    """Average the loss (and accuracy, when `accuracy=True`) over each phase, weighted by batch size.

    After each epoch it appends a record {epoch, phase, loss[, accuracy], step} to `self.history`
    and, when the learner has a run directory, one JSON line to `path/metrics.jsonl`.
    `extra` maps a name to a function(preds, targets) -> float averaged the same way. A stage that
    computes a loss of several terms may set `learn.loss_parts` ({name: scalar tensor}, e.g. the
    reconstruction and KL terms of a VAE): each is averaged and recorded like the loss.
    """

    order = 50
    skip_in_lr_find = True  # the LR finder's batches are not an epoch of this run
    state_key = "MetricsCB"

    def __init__(self, accuracy: bool = False, extra: dict[str, Callable] | None = None):
        self.fns = dict(extra or {})
        if accuracy:
            self.fns["accuracy"] = globals()["accuracy"]
        self.history: list[dict] = []
        self._phase, self._pending = None, None

    def before_epoch(self, learn):
        self._phase = [learn.epoch, "train" if learn.training else "valid"]
        self._sums = {k: 0.0 for k in ["loss", *self.fns]}
        self._count = 0
        if self._pending is not None and self._pending["phase"] == self._phase:  # resumed mid-epoch
            self._sums, self._count = dict(self._pending["sums"]), self._pending["count"]
        self._pending = None

    def after_batch(self, learn):
        n = len(learn.batch[0])
        self._count += n
        self._sums["loss"] += float(learn.loss.detach()) * n
        for k, v in (getattr(learn, "loss_parts", None) or {}).items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach()) * n
        if self.fns:
            preds, targets = learn.preds.detach(), learn.batch[-1]
            for k, fn in self.fns.items():
                self._sums[k] += fn(preds, targets) * n

    def after_epoch(self, learn):
        if not self._count:
            return
        rec = {"epoch": learn.epoch, "phase": "train" if learn.training else "valid", "step": learn.step}
        rec.update({k: v / self._count for k, v in self._sums.items()})  # loss first, then metrics, then parts
        self.history.append(rec)
        learn.last_metrics = rec
        if learn.path is not None:
            append_metrics(learn.path, rec)

    def after_cancel_fit(self, learn):
        """A fit stopped mid-phase (a time budget, SingleBatchCB): record the partial phase too."""
        self.after_epoch(learn)

    def state_dict(self) -> dict:
        """Return the history and the running sums of the current phase (JSON-able), for checkpoints."""
        return {"history": list(self.history), "phase": self._phase,
                "sums": dict(getattr(self, "_sums", {})), "count": getattr(self, "_count", 0)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the running sums continue if the same epoch and phase resume."""
        self.history = list(state["history"])
        self._pending = {k: state[k] for k in ("phase", "sums", "count")}
        self._pending["phase"] = list(state["phase"] or [])

    def latest(self, phase: str = "valid") -> dict | None:
        """Return the most recent record of `phase`, or None."""
        return next((r for r in reversed(self.history) if r["phase"] == phase), None)


class SingleBatchCB(Callback):
    """Stop after one training batch, so `learn.batch`/`learn.preds` can be inspected."""

    order = 100

    def after_batch(self, learn):
        raise CancelFitException()


class BatchTransformCB(Callback):
    """Apply `tfm(x) -> x` to the inputs of each batch (on the training device, after DeviceCB).

    With `on_train=True, on_valid=False` (the default) it is a batch augmentation.
    """

    order = -5

    def __init__(self, tfm: Callable, on_train: bool = True, on_valid: bool = False):
        self.tfm, self.on_train, self.on_valid = tfm, on_train, on_valid

    def before_batch(self, learn):
        if (learn.training and self.on_train) or (not learn.training and self.on_valid):
            learn.batch = (self.tfm(learn.batch[0]), *learn.batch[1:])



"""The training loop: one small class whose behaviour is all callbacks.

A `Learner` runs epochs of batches and, around each stage, calls the matching
method on every callback, sorted by `order`:

    before_fit / after_fit          once per `fit`
    before_epoch / after_epoch      once per phase (training, then validation)
    before_batch / after_batch      once per batch
    before_predict / after_predict, before_loss / after_loss,
    before_backward / after_backward, before_step / after_step

The four working stages themselves -- `predict`, `get_loss`, `backward`,
`step` (plus `zero_grad`) -- are also callback methods: the Learner runs the
*last* callback (highest `order`) that defines each one. `TrainCB` (order 0)
provides the standard supervised versions and is added automatically unless one
is given, so a diffusion objective is one callback of higher order that
overrides `predict`/`get_loss` (see docs/design.md).

Callbacks stop work early by raising `CancelBatchException` (skip the rest of
this batch), `CancelEpochException` (end this phase) or `CancelFitException`
(end training; `after_fit` still runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from .callback import Callback, CancelBatchException, CancelEpochException, CancelFitException, run_cbs
from .callbacks import TrainCB
from .schedules import lr_find

__all__ = ["Learner", "STAGES"]

STAGES = ("predict", "get_loss", "backward", "step", "zero_grad")


class Learner:
    """Fit `model` on `dls` (a DataLoaders with .train/.valid) with `loss_func`, driven by `cbs`.

    State visible to callbacks (the whole API between the loop and its callbacks):
      model, dls, dl (the current loader), opt, loss_func, lr, epoch, n_epochs, iter, batch, preds, loss,
      training (True in the training phase), do_valid, resume, path (run directory or None),
      step (optimizer steps taken in this fit, counting the current batch's from after_step on),
      start_epoch / start_iter (where a resuming callback, in before_fit, says to continue).
    Callbacks may add: `device` (DeviceCB), `sched` (BatchSchedCB), `last_metrics` (MetricsCB: the
    record of the phase that just ended), `loss_parts` (a stage's named loss terms, which MetricsCB
    averages). Anything else a callback keeps, other callbacks reach through
    `learn.cb(Type)`, e.g. `learn.cb(EMACB).ema_model`.
    """

    def __init__(self, model: nn.Module, dls, loss_func: Callable = nn.functional.mse_loss,
                 lr: float = 1e-3, cbs: Iterable[Callback] = (), opt_func: Callable = torch.optim.AdamW,
                 path: str | Path | None = None):
        self.model, self.dls, self.loss_func, self.lr, self.opt_func = model, dls, loss_func, lr, opt_func
        self.cbs = list(cbs)
        if not any(isinstance(cb, TrainCB) for cb in self.cbs):
            self.cbs.append(TrainCB())  # the default stages; callbacks of higher order replace any of them
        self.path = Path(path) if path is not None else None
        self.opt = None
        self.epoch, self.iter, self.step, self.n_epochs = 0, 0, 0, 0
        self.start_epoch, self.start_iter = 0, 0
        self.training, self.do_valid, self.resume = False, True, False
        self.batch = self.preds = self.loss = None

    # -- the stages, each delegated to the last callback that defines it ---------------------
    def _stage(self, name: str) -> None:
        for cb in sorted(self.cbs, key=attrgetter("order"), reverse=True):
            method = getattr(cb, name, None)
            if method is not None:
                return method(self)
        raise AttributeError(f"no callback provides the '{name}' stage; add TrainCB()")

    def predict(self) -> None:
        self._stage("predict")

    def get_loss(self) -> None:
        self._stage("get_loss")

    def backward(self) -> None:
        self._stage("backward")

    def optimizer_step(self) -> None:
        self._stage("step")

    def zero_grad(self) -> None:
        self._stage("zero_grad")

    # -- events -----------------------------------------------------------------------------
    def callback(self, method_name: str) -> None:
        """Run event `method_name` (e.g. 'before_batch') on all callbacks."""
        run_cbs(self.cbs, method_name, self)

    @contextmanager
    def _event(self, name: str, cancel: type[Exception] | None = None, after_on_cancel: bool = False):
        try:
            self.callback(f"before_{name}")
            yield
            self.callback(f"after_{name}")
        except Exception as e:  # noqa: BLE001 - only the matching cancel is swallowed
            if cancel is None or not isinstance(e, cancel):
                raise
            self.callback(f"after_cancel_{name}")
            if after_on_cancel:  # CancelFitException: after_fit still runs (final plots, summaries)
                self.callback(f"after_{name}")
        finally:
            self.callback(f"cleanup_{name}")

    # -- the loop ---------------------------------------------------------------------------
    def _one_batch(self) -> None:
        with self._event("predict"):
            self.predict()
        with self._event("loss"):
            self.get_loss()
        if self.training:
            with self._event("backward"):
                self.backward()
            with self._event("step"):
                self.optimizer_step()
                self.step += 1  # counts optimizer steps taken; after_step/after_batch see this one
            self.zero_grad()

    def _one_epoch(self, training: bool) -> None:
        self.training = training
        self.model.train(training)
        self.dl = self.dls.train if training else self.dls.valid
        if hasattr(self.dl, "set_epoch"):
            self.dl.set_epoch(self.epoch)
        first = 0
        if training and self.epoch == self.start_epoch and self.start_iter:
            first, self.start_iter = self.start_iter, 0
            self.dl.start_iter = first
        with self._event("epoch", CancelEpochException):
            for self.iter, self.batch in enumerate(self.dl, start=first):  # noqa: B020
                with self._event("batch", CancelBatchException):
                    self._one_batch()

    def _fit(self, train: bool, valid: bool) -> None:
        for self.epoch in range(self.start_epoch, self.n_epochs):  # noqa: B020
            if train:
                self._one_epoch(True)
            if valid:
                with torch.no_grad():
                    self._one_epoch(False)

    def fit(self, n_epochs: int = 1, train: bool = True, valid: bool = True,
            cbs: Iterable[Callback] = (), lr: float | None = None, resume: bool = False) -> Learner:
        """Train for `n_epochs` (validating after each when `valid`); `cbs` are added for this fit only.

        `resume=True` asks a CheckpointCB to restore the latest checkpoint and continue from its
        epoch/step. Returns self.
        """
        extra = list(cbs)
        if resume and not any(getattr(cb, "resumes", False) for cb in [*self.cbs, *extra]):
            raise ValueError("fit(resume=True) needs a callback that restores state, such as CheckpointCB; "
                             "without one the run would silently start from scratch")
        self.cbs.extend(extra)
        try:
            self.n_epochs, self.do_valid, self.resume = n_epochs, valid, resume
            self.start_epoch, self.start_iter, self.step = 0, 0, 0
            if lr is not None:
                self.lr = lr
            self.opt = self.opt_func(self.model.parameters(), lr=self.lr)
            with self._event("fit", CancelFitException, after_on_cancel=True):
                self._fit(train, valid)
        finally:
            for cb in extra:
                self.cbs.remove(cb)
        return self

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
                stop_div: bool = True) -> tuple[list[float], list[float]]:
        """Run the LR range test (see `schedules.lr_find`); returns (lrs, losses), weights unchanged."""
        return lr_find(self, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, stop_div=stop_div)

    def cb(self, cls: type) -> Callback | None:
        """Return the first attached callback of type `cls`, or None."""
        return next((c for c in self.cbs if isinstance(c, cls)), None)

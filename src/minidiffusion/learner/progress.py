"""Progress: nested tqdm bars (epochs, batches), one table row per epoch phase, a loss curve PNG.

The bars go to stdout and switch themselves off when stdout is not a terminal (logs, CI,
pipes); there a plain line with the step, running loss, speed and time left (to the epoch's
end, or to a TimeBudgetCB's end when that comes first) takes their place every `log_every`
seconds, so a long epoch in a log file is not silent. The table rows are printed either way.
With a TimeBudgetCB, the training bar also shows the seconds left in the budget.
Rows show the record MetricsCB just made (`learn.last_metrics`), so add MetricsCB before
ProgressCB's order (50 < 70) to see accuracy etc.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .callback import Callback
from .plotting import new_figure, save_figure
from .time_budget import TimeBudgetCB

__all__ = ["ProgressCB"]


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _log_tensor(log: list[tuple[int, float]]) -> torch.Tensor:
    return torch.tensor(log, dtype=torch.float64).reshape(-1, 2)


class ProgressCB(Callback):
    """Show progress bars with the smoothed training loss and print each phase's metrics as a row.

    `train_log` holds (step, loss) for every training batch and `valid_log` (step, mean loss) for
    every validation phase. With `plot=True` and a `learn.path`, `loss.png` (training loss per step,
    validation loss per epoch, against the optimizer step) is rewritten after every epoch and at fit end;
    callbacks with a `curve()` method (FIDCB) add a panel beside it.
    """

    order = 70
    skip_in_lr_find = True
    state_key = "ProgressCB"

    def __init__(self, plot: bool = True, beta: float = 0.98, show: bool = True, log_every: float = 60.0):
        self.plot, self.beta, self.show = plot, beta, show  # show=False: only the PNG, nothing printed
        self.log_every = log_every  # seconds between plain progress lines when the bars are off
        self.train_log: list[tuple[int, float]] = []
        self.valid_log: list[tuple[int, float]] = []
        self._epoch_bar = self._batch_bar = None

    def _bar(self, **kwargs) -> tqdm:
        return tqdm(file=sys.stdout, disable=None if self.show else True, dynamic_ncols=True, **kwargs)

    def before_fit(self, learn) -> None:
        self._columns, self._smooth, self._n_smooth = None, 0.0, 0
        self._budget = learn.cb(TimeBudgetCB)  # once per fit, not per batch

    def before_epoch(self, learn) -> None:
        if self._epoch_bar is None:  # created here: a resuming CheckpointCB sets the start in before_fit
            self._epoch_bar = self._bar(total=learn.n_epochs, initial=learn.epoch, desc="epochs")
        total = len(learn.dl) if hasattr(learn.dl, "__len__") else None
        self._batch_bar = self._bar(total=total, initial=getattr(learn.dl, "start_iter", 0), leave=False,
                                    desc="train" if learn.training else "valid")
        self._t0, self._sum, self._count = time.perf_counter(), 0.0, 0
        self._last_line, self._start, self._done, self._total = self._t0, self._batch_bar.n, self._batch_bar.n, total

    def after_batch(self, learn) -> None:
        loss = float(learn.loss.detach())
        n = len(learn.batch[0]) if isinstance(learn.batch, (tuple, list)) else 1
        self._sum, self._count = self._sum + loss * n, self._count + n
        shown = self._sum / self._count
        if learn.training:
            self.train_log.append((learn.step, loss))
            self._smooth = self.beta * self._smooth + (1 - self.beta) * loss
            self._n_smooth += 1
            shown = self._smooth / (1 - self.beta**self._n_smooth)  # debiased running average
        budget = f", {self._budget_left()}" if self._budget is not None and learn.training else ""
        self._batch_bar.set_postfix_str(f"loss {shown:.4f}{budget}", refresh=False)
        self._batch_bar.update()
        self._done += 1
        if self.show and self._batch_bar.disable and time.perf_counter() - self._last_line >= self.log_every:
            self._print_line(learn, shown)

    def _print_line(self, learn, loss: float) -> None:
        """Print where the current phase is (for logs, where the bars are off)."""
        now = time.perf_counter()
        self._last_line = now
        done, total = self._done, self._total
        rate = (done - self._start) / max(now - self._t0, 1e-9)
        where = f"{done}/{total}" if total else f"{done}"
        left = (total - done) / rate if total and rate > 0 else None
        eta = f", {left:.0f}s left" if left is not None else ""
        if self._budget is not None and learn.training and (left is None or self._budget.seconds_left < left):
            eta = f", {self._budget_left()}"  # the budget ends the fit before the epoch does
        phase = "train" if learn.training else "valid"
        tqdm.write(f"  {phase} epoch {learn.epoch + 1}/{learn.n_epochs}: batch {where}, loss {loss:.4f}, "
                   f"{rate:.2f} batches/s{eta}", file=sys.stdout)
        sys.stdout.flush()

    def _budget_left(self) -> str:
        return f"{self._budget.seconds_left:.0f}s left in the time budget"

    def after_epoch(self, learn) -> None:
        phase = "train" if learn.training else "valid"
        rec = getattr(learn, "last_metrics", None)
        if not (rec and rec.get("epoch") == learn.epoch and rec.get("phase") == phase):  # no MetricsCB
            rec = {"epoch": learn.epoch, "phase": phase, "step": learn.step,
                   "loss": self._sum / max(self._count, 1)}
        self._print_row({**rec, "time": f"{time.perf_counter() - self._t0:.1f}s"})
        if not learn.training:
            self.valid_log.append((learn.step, float(rec["loss"])))
        if not learn.training or not learn.do_valid:
            self._epoch_bar.update()
            self._save_plot(learn)

    def _print_row(self, rec: dict) -> None:
        if not self.show:
            return
        if list(rec) != self._columns:
            self._columns = list(rec)
            tqdm.write("  ".join(f"{c:>9}" for c in rec), file=sys.stdout)
        tqdm.write("  ".join(f"{_fmt(v):>9}" for v in rec.values()), file=sys.stdout)
        sys.stdout.flush()  # rows must reach logs and pipes as they happen, not at exit

    def cleanup_epoch(self, learn) -> None:
        if self._batch_bar is not None:
            self._batch_bar.close()
            self._batch_bar = None

    def after_fit(self, learn) -> None:
        self._save_plot(learn)

    def cleanup_fit(self, learn) -> None:
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None

    def _save_plot(self, learn) -> None:
        if self.plot and learn.path is not None and (self.train_log or self.valid_log):
            extra = [cb.curve() for cb in learn.cbs if callable(getattr(cb, "curve", None))]
            self.plot_losses(learn.path / "loss.png", extra=[c for c in extra if c[1]])

    def plot_losses(self, path: str | Path, extra: list[tuple[str, list[tuple[int, float]]]] = ()) -> Path:
        """Write the loss curves (training per step, validation per epoch) as a PNG; returns the path.

        Each (title, [(step, value)]) in `extra` (e.g. FIDCB's FID) gets its own panel to the right,
        on the same optimizer-step axis.
        """
        fig, axes = new_figure(1, 1 + len(extra))
        ax = axes[0, 0]
        for log, style, label in ((self.train_log, "-", "train (per step)"),
                                  (self.valid_log, "o-", "valid (per epoch)")):
            if log:
                steps, losses = zip(*log, strict=True)
                ax.plot(steps, losses, style, label=label, alpha=0.8)
        ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
        ax.legend()
        for ax, (title, log) in zip(axes[0, 1:], extra, strict=True):
            steps, values = zip(*log, strict=True)
            ax.plot(steps, values, "o-", color="tab:red")
            ax.set(xlabel="optimizer step", title=title, xlim=axes[0, 0].get_xlim())
        return save_figure(fig, path)

    def state_dict(self) -> dict:
        """Return the loss logs as float64 tensors [n, 2] of (step, loss), for checkpoints."""
        return {"train": _log_tensor(self.train_log), "valid": _log_tensor(self.valid_log)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the loss logs from `state_dict()`."""
        self.train_log, self.valid_log = ([(int(s), float(v)) for s, v in state[k].tolist()]
                                          for k in ("train", "valid"))

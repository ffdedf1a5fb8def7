"""ProgressCB: table rows from MetricsCB, nested bars on a terminal, loss.png, loss logs."""

from __future__ import annotations

import io

import pytest
import torch

from minidiffusion.learner import Callback, CancelFitException, Learner, MetricsCB, ProgressCB
from test_learner_helpers import mlp, regression_dls


def _learner(cbs, path=None) -> Learner:
    return Learner(mlp(), regression_dls(n_train=32, bs=8), lr=1e-2, cbs=cbs, path=path)


def test_rows_show_metrics_and_loss_png_is_written(tmp_path, capsys):
    metrics, progress = MetricsCB(accuracy=False), ProgressCB()
    learn = _learner([metrics, progress], tmp_path)
    learn.fit(2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["epoch", "phase", "step", "loss", "time"]
    rows = [line.split() for line in out[1:]]
    assert [r[:3] for r in rows] == [["0", "train", "4"], ["0", "valid", "4"], ["1", "train", "8"],
                                     ["1", "valid", "8"]]
    assert [float(r[3]) for r in rows] == pytest.approx([m["loss"] for m in metrics.history], abs=1e-4)
    assert "\r" not in "".join(out)  # stdout is not a terminal here: no bars
    assert [s for s, _ in progress.train_log] == list(range(1, 9))
    assert progress.valid_log == [(4, metrics.history[1]["loss"]), (8, metrics.history[3]["loss"])]
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_rows_without_metrics_cb_use_the_mean_batch_loss(capsys):
    progress = ProgressCB(plot=False)
    learn = _learner([progress])
    learn.fit(1, train=False)
    row = capsys.readouterr().out.splitlines()[1].split()
    x, y = learn.dls.valid.tensors
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(learn.model(x), y).item()
    assert row[:3] == ["0", "valid", "0"] and float(row[3]) == pytest.approx(expected, abs=1e-4)


def test_logs_get_plain_progress_lines_instead_of_bars(capsys):
    _learner([MetricsCB(accuracy=False), ProgressCB(plot=False, log_every=0)]).fit(1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "batches/s" in ln]
    train = [ln for ln in lines if ln.lstrip().startswith("train epoch 1/1")]
    assert [ln.split("batch ")[1].split(",")[0] for ln in train] == ["1/4", "2/4", "3/4", "4/4"]
    assert "loss " in train[0] and "s left" in train[0]
    assert any(ln.lstrip().startswith("valid epoch 1/1") for ln in lines)
    _learner([ProgressCB(plot=False)]).fit(1)  # the default waits a minute between lines
    assert "batches/s" not in capsys.readouterr().out


def test_log_lines_count_down_a_time_budget_that_ends_before_the_epoch(monkeypatch, capsys):
    # Each step costs 1 s of the 10 s budget; the progress clock makes the epoch look hours long.
    from types import SimpleNamespace

    from minidiffusion.learner import TimeBudgetCB
    from minidiffusion.learner import progress as progress_module
    ticks = iter(range(0, 10**9, 100))
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    budget_clock = iter(range(10**9))
    budget = TimeBudgetCB(minutes=10 / 60, max_lr=1e-2, clock=lambda: float(next(budget_clock)))
    learn = Learner(mlp(), regression_dls(n_train=400, bs=8), lr=1e-2,
                    cbs=[budget, ProgressCB(plot=False, log_every=0)])
    learn.fit(3)
    train = [ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("train epoch")]
    assert budget.steps == 10 and len(train) == 10  # 50 batches an epoch, but the budget ends after 10
    assert [ln.split(", ")[-1] for ln in train] == [f"{10 - k}s left in the time budget" for k in range(1, 11)]


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_nested_bars_on_a_terminal_show_the_running_loss(monkeypatch):
    fake = FakeTTY()
    monkeypatch.setattr("sys.stdout", fake)
    progress = ProgressCB(plot=False)
    _learner([MetricsCB(), progress]).fit(2)
    text = fake.getvalue()
    assert "epochs: 100%" in text and "2/2" in text  # the outer bar
    assert "train" in text and "4/4" in text and "loss " in text  # the inner bar with the loss
    assert "valid" in text
    assert progress._epoch_bar is None and progress._batch_bar is None  # closed
    assert "batches/s" not in text  # on a terminal the bars do the job of the plain lines


def test_a_terminal_bar_shows_what_is_left_of_a_time_budget(monkeypatch):
    from minidiffusion.learner import TimeBudgetCB
    fake = FakeTTY()
    monkeypatch.setattr("sys.stdout", fake)
    ticks = iter(range(10**9))
    budget = TimeBudgetCB(minutes=100 / 60, max_lr=1e-2, clock=lambda: float(next(ticks)))  # 1 s a step
    Learner(mlp(), regression_dls(n_train=32, bs=8), lr=1e-2, cbs=[budget, ProgressCB(plot=False)]).fit(2)
    text = fake.getvalue()
    assert budget.steps == 8 and "4/4" in text  # each epoch's bar is drawn once more when it completes
    assert "96s left in the time budget" in text and "92s left in the time budget" in text


def test_plot_at_fit_end_after_cancel_and_logs_round_trip(tmp_path):
    class StopEarly(Callback):
        order = 80  # after ProgressCB logged the batch

        def after_batch(self, learn):
            if learn.step == 3:
                raise CancelFitException()

    progress = ProgressCB()
    _learner([MetricsCB(), StopEarly(), progress], tmp_path).fit(2)
    assert (tmp_path / "loss.png").exists()  # written by after_fit, though no epoch ended
    fresh = ProgressCB()
    fresh.load_state_dict(progress.state_dict())
    assert fresh.train_log == progress.train_log and len(fresh.train_log) == 3

"""The Learner core: event order, cancel exceptions, stage delegation, fit-only callbacks, metrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from minidiffusion.learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Learner,
    MetricsCB,
    SingleBatchCB,
    TrainCB,
)
from test_learner_helpers import TRUE_B, TRUE_W, RaiseAt, Recorder, regression_dls, weights


def linear_learner(cbs=(), lr=0.1, **kw) -> Learner:
    torch.manual_seed(0)
    return Learner(nn.Linear(3, 1), regression_dls(**kw), lr=lr, cbs=cbs, opt_func=torch.optim.SGD)


def test_callbacks_run_sorted_by_order_whatever_the_insertion_order():
    log = []
    cbs = [Recorder(log, "late", order=5), Recorder(log, "early", order=-3), Recorder(log, "mid", order=0)]
    linear_learner(cbs).fit(1, valid=False)
    before_fit = [tag for tag, ev in log if ev == "before_fit"]
    assert before_fit == ["early", "mid", "late"]
    first_batch = [tag for tag, ev in log[: 3 + 3 + 3] if ev == "before_batch"]
    assert first_batch == ["early", "mid", "late"]
    # per batch: before_batch x3 then after_batch x3, 8 batches
    assert sum(ev == "after_batch" for _, ev in log) == 3 * 8


def test_step_counts_optimizer_steps_and_is_visible_in_after_step():
    seen = []

    class StepSpy(Callback):
        def before_batch(self, learn):
            seen.append(("before", learn.step))

        def after_step(self, learn):
            seen.append(("after_step", learn.step))

    learn = linear_learner([StepSpy()])
    learn.fit(2)
    assert learn.step == 16
    assert seen[:4] == [("before", 0), ("after_step", 1), ("before", 1), ("after_step", 2)]


def test_cancel_batch_skips_the_rest_of_that_batch_only():
    log = []
    learn = linear_learner([RaiseAt("after_predict", CancelBatchException, at=(0, 2)),
                            Recorder(log, events=("after_loss", "after_step", "after_cancel_batch"))])
    learn.fit(1, valid=False)
    assert log.count(("", "after_cancel_batch")) == 1
    assert log.count(("", "after_loss")) == 7 and log.count(("", "after_step")) == 7
    assert learn.step == 7  # the cancelled batch took no optimizer step


def test_cancel_batch_before_step_leaves_weights_untouched():
    class StopAfterCancel(Callback):
        def after_cancel_batch(self, learn):
            raise CancelFitException()

    learn = linear_learner([RaiseAt("before_step", CancelBatchException, at=(0, 0)), StopAfterCancel()])
    w0 = weights(learn.model)
    learn.fit(1)
    assert learn.step == 0 and learn.iter == 0
    assert torch.equal(w0["weight"], learn.model.weight) and torch.equal(w0["bias"], learn.model.bias)


def test_cancel_epoch_ends_the_phase_but_validation_and_next_epochs_run():
    log = []
    learn = linear_learner([RaiseAt("after_batch", CancelEpochException, at=(0, 2)),
                            Recorder(log, events=("after_epoch", "after_cancel_epoch", "before_epoch"))])
    learn.fit(2)
    assert learn.step == 3 + 8  # epoch 0 stopped after 3 batches, epoch 1 complete
    assert log.count(("", "after_cancel_epoch")) == 1
    assert log.count(("", "before_epoch")) == 4  # train + valid, twice
    assert log.count(("", "after_epoch")) == 3  # the cancelled phase has no after_epoch


def test_cancel_fit_stops_training_and_after_fit_still_runs():
    log = []
    learn = linear_learner([RaiseAt("after_batch", CancelFitException, at=(1, 0)),
                            Recorder(log, events=("after_fit", "after_cancel_fit", "cleanup_fit",
                                                  "before_epoch"))])
    assert learn.fit(5) is learn  # returns normally
    assert learn.epoch == 1 and learn.step == 9
    assert [ev for _, ev in log if ev != "before_epoch"] == ["after_cancel_fit", "after_fit", "cleanup_fit"]


def test_other_exceptions_propagate_and_cleanup_still_runs():
    log = []
    learn = linear_learner([RaiseAt("after_batch", KeyError, at=(0, 1)),
                            Recorder(log, events=("cleanup_fit",))])
    with pytest.raises(KeyError):
        learn.fit(1)
    assert log == [("", "cleanup_fit")]


def test_highest_order_provider_of_a_stage_wins():
    calls = []

    class Doubled(Callback):
        order = 5

        def predict(self, learn):
            calls.append("order5")
            learn.preds = 2 * learn.model(learn.batch[0])

    class Lower(Callback):
        order = 1

        def predict(self, learn):
            calls.append("order1")
            learn.preds = learn.model(learn.batch[0])

    class ZeroLoss(Callback):
        order = 3

        def get_loss(self, learn):
            learn.loss = (learn.preds * 0).sum()

    learn = linear_learner([Lower(), Doubled(), ZeroLoss(), TrainCB()], n_train=8)
    w0 = weights(learn.model)
    learn.fit(1, valid=False)
    assert calls == ["order5"]
    assert isinstance(learn.preds, torch.Tensor)
    assert torch.equal(w0["weight"], learn.model.weight)  # the zero loss from ZeroLoss was used
    xb = learn.batch[0]
    assert torch.allclose(learn.preds, 2 * learn.model(xb))


def test_train_cb_is_added_only_when_no_callback_predicts():
    assert isinstance(linear_learner().cb(TrainCB), TrainCB)

    class OwnStages(TrainCB):
        order = 2

    learn = linear_learner([OwnStages()])
    assert sum(isinstance(c, TrainCB) for c in learn.cbs) == 1


def test_fit_callbacks_are_removed_after_fit_even_after_an_error():
    learn = linear_learner()
    n = len(learn.cbs)
    learn.fit(1, cbs=[MetricsCB()])
    assert len(learn.cbs) == n and learn.cb(MetricsCB) is None
    with pytest.raises(KeyError):
        learn.fit(1, cbs=[RaiseAt("after_batch", KeyError, at=(0, 0))])
    assert len(learn.cbs) == n


def test_resume_without_a_resuming_callback_is_refused(tmp_path):
    learn = linear_learner()
    before = weights(learn.model)
    with pytest.raises(ValueError, match="needs a callback that restores state, such as CheckpointCB"):
        learn.fit(1, resume=True)
    after = weights(learn.model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # refused before any training
    from minidiffusion.learner import CheckpointCB

    learn.fit(1, cbs=[CheckpointCB(tmp_path)])  # with one it runs (here: nothing to resume yet)
    learn.fit(1, resume=True, cbs=[CheckpointCB(tmp_path)])


def test_single_batch_cb_stops_after_one_batch():
    learn = linear_learner([SingleBatchCB()])
    learn.fit(3)
    assert learn.step == 1 and learn.iter == 0 and learn.epoch == 0
    assert learn.preds.shape == (8, 1) and learn.batch[0].shape == (8, 3)


def test_metrics_average_is_weighted_by_batch_size_and_written_as_jsonl(tmp_path):
    dls = regression_dls(n_train=10, n_valid=5, bs=4, shuffle=False)  # batches of 4, 4, 2 / 4, 1
    model = nn.Linear(3, 1)
    metrics = MetricsCB(extra={"mae": lambda p, t: (p - t).abs().mean().item()})
    learn = Learner(model, dls, lr=0.0, cbs=[metrics], opt_func=torch.optim.SGD, path=tmp_path)
    learn.fit(1)
    x, y = dls.valid.tensors
    with torch.no_grad():
        per_batch = [((model(x[s]) - y[s]) ** 2).mean().item() for s in (slice(0, 4), slice(4, 5))]
        expected = (4 * per_batch[0] + 1 * per_batch[1]) / 5
        mae = (model(x) - y).abs().mean().item()
    valid = metrics.latest("valid")
    assert valid["loss"] == pytest.approx(expected, rel=1e-6)
    assert valid["mae"] == pytest.approx(mae, rel=1e-6)
    assert expected != pytest.approx(sum(per_batch) / 2, rel=1e-3)  # plain batch mean would differ
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == ["train", "valid"]
    assert lines[1] == valid and lines[0]["step"] == 3


def test_linear_regression_learns():
    learn = linear_learner([metrics := MetricsCB()], lr=0.1, n_train=256)
    learn.fit(4)
    assert metrics.latest("valid")["loss"] < 1e-3
    assert torch.allclose(learn.model.weight, TRUE_W.T, atol=0.02)
    assert learn.model.bias.item() == pytest.approx(TRUE_B, abs=0.02)


def test_resolve_device_and_synchronize_on_cpu():
    from minidiffusion.learner import default_device, resolve_device, synchronize

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == default_device()
    synchronize("cpu")  # a no-op that must not touch CUDA on a CPU-only machine
    synchronize(torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.cuda.synchronize()  # what synchronize("cpu") must avoid here

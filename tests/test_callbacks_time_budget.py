"""TimeBudgetCB: a one-cycle LR over the clock, only training time counted, and exact resume of the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minidiffusion.learner import Callback, CheckpointCB, Learner, TimeBudgetCB, one_cycle_lr
from test_learner_helpers import regression_dls


def test_one_cycle_lr_shape():
    assert one_cycle_lr(0.0, 1.0) == pytest.approx(1 / 25)
    assert one_cycle_lr(0.25, 1.0) == pytest.approx(1.0)
    assert one_cycle_lr(1.0, 1.0) == pytest.approx(1 / 25e4)
    assert one_cycle_lr(-1.0, 1.0) == one_cycle_lr(0.0, 1.0) and one_cycle_lr(2.0, 1.0) == one_cycle_lr(1.0, 1.0)
    ups = [one_cycle_lr(f, 1.0) for f in torch.linspace(0, 0.25, 11).tolist()]
    downs = [one_cycle_lr(f, 1.0) for f in torch.linspace(0.25, 1, 11).tolist()]
    assert ups == sorted(ups) and downs == sorted(downs, reverse=True)
    assert one_cycle_lr(0.625, 1.0) == pytest.approx((1 + 1 / 25e4) / 2)  # cosine: halfway down at mid-anneal


class Ticks(Callback):
    """A fake clock that moves one second during every batch, training or validation."""

    order = 0

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def after_predict(self, learn) -> None:
        self.now += 1.0


class LRLog(Callback):
    def __init__(self):
        self.lrs = []

    def before_step(self, learn) -> None:
        self.lrs.append(learn.opt.param_groups[0]["lr"])


def _learner(clock: Ticks, path=None, extra=()) -> tuple[Learner, TimeBudgetCB, LRLog]:
    torch.manual_seed(0)
    budget, log = TimeBudgetCB(0.1, max_lr=0.1, clock=clock), LRLog()  # 6 s: six one-second steps
    cbs = [clock, budget, log, *extra]
    learn = Learner(nn.Linear(3, 1), regression_dls(n_train=32, n_valid=16, bs=8, shuffle=False), lr=0.1,
                    cbs=cbs, opt_func=torch.optim.SGD, path=path)
    return learn, budget, log


def test_budget_counts_training_batches_only_and_sets_the_lr_from_the_clock():
    learn, budget, log = _learner(Ticks())
    learn.fit(100)
    # 4 training batches per epoch, 2 validation batches (which also tick the clock but do not count)
    assert learn.step == 6 and budget.steps == 6 and budget.seconds == 6.0
    assert (learn.epoch, learn.iter) == (1, 2)
    assert log.lrs == pytest.approx([one_cycle_lr(k / 6, 0.1) for k in range(6)])


class Interrupt(Exception):
    pass


class StopAfterStep(Callback):
    order = 2000  # after CheckpointCB has written its step checkpoint

    def __init__(self, at: int):
        self.at = at  # (a callback attribute named `step` would replace the Learner's step stage)

    def after_batch(self, learn) -> None:
        if learn.training and learn.step == self.at:
            raise Interrupt()


def test_a_resumed_budget_run_spends_only_what_was_left_on_the_same_schedule(tmp_path):
    full, _, full_log = _learner(Ticks())
    full.fit(100)

    learn, _, first_log = _learner(Ticks(), tmp_path, [CheckpointCB(every_n_steps=1), StopAfterStep(4)])
    with pytest.raises(Interrupt):
        learn.fit(100)
    again, budget, second_log = _learner(Ticks(), tmp_path, [CheckpointCB(every_n_steps=1)])
    again.fit(100, resume=True)
    assert budget.steps == 6 and again.step == 6  # two more steps, not a fresh six
    assert first_log.lrs + second_log.lrs == pytest.approx(full_log.lrs)
    for a, b in zip(full.model.parameters(), again.model.parameters(), strict=True):
        assert torch.allclose(a, b)

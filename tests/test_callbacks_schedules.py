"""LR schedule callbacks and the LR finder."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from minidiffusion.learner import (
    BatchSchedCB,
    CheckpointCB,
    Learner,
    LRFinderCB,
    MetricsCB,
    OneCycleCB,
    ProgressCB,
    lr_find,
    suggest_lr,
)
from test_learner_helpers import mlp, regression_dls, weights


def _learner(cbs=(), path=None, n_train=64, bs=8) -> Learner:
    return Learner(mlp(), regression_dls(n_train=n_train, bs=bs), lr=1e-3, cbs=list(cbs), path=path,
                   opt_func=partial(torch.optim.AdamW, eps=1e-5))


def test_batch_sched_steps_once_per_optimizer_step():
    cb = BatchSchedCB(partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5))
    learn = _learner([cb])
    learn.fit(2)  # 16 steps; validation batches must not step the scheduler
    assert cb.lrs == [1e-3 * 0.5 ** (i // 3) for i in range(16)]
    assert learn.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** (16 // 3))
    assert cb.state_dict()["last_epoch"] == 16


def test_one_cycle_spans_all_steps_of_the_fit():
    cb = OneCycleCB(max_lr=0.1, pct_start=0.25)
    learn = _learner([cb])
    learn.fit(3)  # 24 steps: stepping the 25th time would raise inside OneCycleLR
    assert cb.sched.total_steps == 24 and len(cb.lrs) == 24
    peak = max(range(24), key=cb.lrs.__getitem__)
    assert cb.lrs[peak] == pytest.approx(0.1) and peak == round(0.25 * 24) - 1
    assert cb.lrs[0] == pytest.approx(0.1 / 25) and cb.lrs[-1] < 1e-4
    assert all(a < b for a, b in zip(cb.lrs[:peak], cb.lrs[1:peak + 1], strict=True))
    # momentum (AdamW's beta1) cycles the other way
    assert learn.opt.param_groups[0]["betas"][0] == pytest.approx(0.95, abs=1e-3)


@pytest.mark.parametrize("steps,pct_start", [(4, 0.25), (2, 0.5), (8, 0.125)])
def test_one_cycle_trains_when_the_warm_up_is_a_single_step(steps, pct_start):
    # torch's OneCycleLR divides by zero when pct_start * total_steps == 1 (e.g. a 4-step tiny run)
    cb = OneCycleCB(max_lr=0.1, pct_start=pct_start)
    _learner([cb], n_train=8 * steps).fit(1)
    assert len(cb.lrs) == steps and max(cb.lrs) <= 0.1 + 1e-9 and cb.lrs[-1] < cb.lrs[0] * 25


def test_scheduler_state_restores_into_a_new_callback():
    cb = OneCycleCB(max_lr=0.1)
    learn = _learner([cb])
    learn.fit(1)
    state = cb.state_dict()
    fresh = OneCycleCB(max_lr=0.1)
    fresh.load_state_dict(state)  # before fit: applied once the scheduler exists
    learn2 = _learner([fresh])
    learn2.fit(1, train=False)
    assert fresh.sched.last_epoch == 8 and fresh.sched.get_last_lr() == cb.sched.get_last_lr()


def test_lr_finder_grows_lr_exponentially_and_stops_on_divergence(tmp_path):
    learn = _learner([OneCycleCB(max_lr=0.1), MetricsCB(), ProgressCB(), CheckpointCB()], path=tmp_path,
                     n_train=256, bs=32)
    before = weights(learn.model)
    opt_before = learn.opt
    rng_before = torch.get_rng_state()
    lrs, losses = learn.lr_find(start_lr=1e-5, end_lr=100, num_iter=40)
    assert 5 < len(lrs) < 40  # stopped early: lr 100 diverges
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert ratios == pytest.approx([(100 / 1e-5) ** (1 / 39)] * len(ratios))
    assert lrs[0] == pytest.approx(1e-5)
    assert not math.isfinite(losses[-1]) or losses[-1] > 4 * min(losses)  # the diverging point
    assert lrs[-1] > 1e-2 and min(losses) < losses[0]  # it did learn before diverging
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert learn.opt is opt_before and torch.equal(torch.get_rng_state(), rng_before)
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # schedule, metrics, progress and checkpoint callbacks stayed out of it, and are still attached
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    assert learn.cb(OneCycleCB) is not None and learn.cb(LRFinderCB) is None
    best = min(range(len(losses)), key=losses.__getitem__)
    assert suggest_lr(lrs, losses) == pytest.approx(lrs[best] / 10)


def test_lr_finder_without_stop_div_runs_num_iter_batches_across_epochs():
    learn = Learner(nn.Linear(3, 1), regression_dls(n_train=16, bs=8), opt_func=torch.optim.SGD)
    lrs, losses = lr_find(learn, start_lr=1e-4, end_lr=1e-1, num_iter=7, stop_div=False)
    assert len(lrs) == len(losses) == 7 and lrs[-1] == pytest.approx(1e-1)
    assert learn.epoch == 3  # 2 batches per epoch: the finder trained over 4 epochs
    assert learn.path is None  # and wrote no plot


def test_lr_finder_rejects_bad_ranges():
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        LRFinderCB(start_lr=1.0, end_lr=0.1)

"""EMACB: the average matches a hand computation, buffers, warmup, validation with EMA weights, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minidiffusion.learner import (
    EMACB,
    ActivationStatsCB,
    Callback,
    Learner,
    MetricsCB,
    copy_without_hooks,
    ema_decay,
)
from test_learner_helpers import regression_dls, weights


def test_update_matches_hand_computation_with_and_without_warmup():
    model = nn.Linear(1, 1, bias=False)
    cb = EMACB(decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)

    class L:
        pass

    learn = L()
    learn.model = model
    cb.before_fit(learn)
    ema = 1.0
    for value in (3.0, -1.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        assert cb.update(model) == 0.5
        ema = 0.5 * ema + 0.5 * value  # 2.0, 0.5, 2.75
    assert cb.ema_model.weight.item() == ema == 2.75
    decays = [ema_decay(n, 0.999, True) for n in (0, 1, 10, 10_000)]
    assert decays == pytest.approx([0.1, 2 / 11, 11 / 20, 0.999])


def test_ema_tracks_training_steps_in_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    history = []

    class Snapshot(Callback):
        order = 10  # after the step, before EMACB (order 20) reads the weights

        def after_step(self, learn):
            history.append(weights(learn.model))

    initial = weights(model)
    cb = EMACB(decay=0.9, warmup=True)
    Learner(model, regression_dls(n_train=32), lr=1e-2, cbs=[Snapshot(), cb]).fit(2)
    expected = {k: v.double() for k, v in initial.items() if v.is_floating_point()}
    for n, snap in enumerate(history):
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in snap.items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v.double()
    ema = cb.ema_model.state_dict()
    assert cb.n_updates == len(history) == 8
    for k in expected:  # parameters and the BatchNorm running stats; the counter is copied
        assert torch.allclose(ema[k].double(), expected[k], rtol=1e-5, atol=1e-6), k
    assert ema["1.num_batches_tracked"].item() == 8
    assert not torch.allclose(ema["0.weight"], model[0].weight)  # really an average, not a copy


def test_validation_can_use_the_ema_weights():
    torch.manual_seed(0)
    dls = regression_dls(n_train=32)
    results = {}
    for use in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        cb, metrics = EMACB(decay=0.99, use_for_valid=use), MetricsCB()
        learn = Learner(model, dls, lr=0.1, cbs=[cb, metrics], opt_func=torch.optim.SGD).fit(1)
        assert learn.model is model  # swapped back after validation
        x, y = dls.valid.tensors
        with torch.no_grad():
            results[use] = metrics.latest("valid")["loss"], nn.functional.mse_loss(cb.ema_model(x), y).item()
    assert results[True][0] == pytest.approx(results[True][1], rel=1e-5)
    assert results[False][0] != pytest.approx(results[False][1], rel=1e-3)


def test_state_dict_round_trip_and_hooks_are_not_copied():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    acts = ActivationStatsCB()
    cb = EMACB(decay=0.9)
    Learner(model, regression_dls(n_train=16), cbs=[acts, cb]).fit(1)
    assert len(acts.stats) == 2  # the activation hooks were on the model while EMACB copied it...
    assert not any(m._forward_hooks for m in cb.ema_model.modules())  # ...but not on the copy
    model[0].register_forward_hook(lambda *a: None)
    copy = copy_without_hooks(model)
    assert not copy[0]._forward_hooks and model[0]._forward_hooks
    state = cb.state_dict()
    fresh = EMACB(decay=0.9)
    fresh.load_state_dict(state)

    class L:
        pass

    learn = L()
    learn.model = model
    fresh.before_fit(learn)
    assert fresh.n_updates == cb.n_updates == 2
    assert all(torch.equal(v, cb.ema_model.state_dict()[k]) for k, v in fresh.ema_model.state_dict().items())

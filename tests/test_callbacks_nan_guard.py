"""NaNGuardCB: a non-finite loss stops training before it reaches the weights or the checkpoints."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.errors import TrainingError
from minidiffusion.learner import (
    Callback,
    CheckpointCB,
    Learner,
    NaNGuardCB,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    unflatten_state,
)
from test_learner_helpers import PoisonLoss, assert_same_weights, mlp, regression_dls, weights


def test_nan_loss_raises_naming_epoch_and_step_and_keeps_weights_and_checkpoint(tmp_path):
    learn = Learner(mlp(), regression_dls(n_train=32, bs=8), lr=1e-2, path=tmp_path,
                    cbs=[NaNGuardCB(), CheckpointCB(every_n_steps=1, keep=2)])
    with pytest.raises(TrainingError) as e:
        learn.fit(3, cbs=[PoisonLoss(at=(1, 2))])
    msg = str(e.value)
    assert "the loss became nan at epoch 1" in msg and "training batch 2" in msg
    assert "after 6 optimizer steps" in msg
    assert "lower the learning rate" in msg and "mixed precision off" in msg
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "ckpt-000007-e0001-i000002"  # the 6th step, the last complete batch
    tensors, meta = load_checkpoint(last)
    assert meta["step"] == 6 and len(list_checkpoints(tmp_path / "checkpoints")) == 2
    saved = unflatten_state(meta["state"], tensors)["model"]
    assert_same_weights(saved, weights(learn.model))  # the NaN batch changed neither


def test_without_the_guard_nan_reaches_the_weights():
    learn = Learner(mlp(), regression_dls(n_train=32, bs=8), lr=1e-2)
    learn.fit(1, cbs=[PoisonLoss(at=(0, 1))])
    assert not all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_gradient_check_names_the_parameter():
    class NaNGrad(Callback):
        order = -30

        def after_backward(self, learn):
            learn.model[3].bias.grad.fill_(float("inf"))

    learn = Learner(mlp(), regression_dls(), cbs=[NaNGrad(), NaNGuardCB(check_grads=True)])
    with pytest.raises(TrainingError, match=r"gradient of 3\.bias holds NaN/inf at epoch 0"):
        learn.fit(1)

"""MixedPrecisionCB: no-op with a note on CPU, CPU autocast when forced, fp16 loss scaling, cleanup."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.errors import ConfigError, TrainingError
from minidiffusion.learner import Callback, DeviceCB, Learner, MetricsCB, MixedPrecisionCB, NaNGuardCB
from test_learner_helpers import PoisonLoss, RaiseAt, assert_same_weights, mlp, regression_dls, weights


class DtypeSpy(Callback):
    """Record the dtype of the predictions and of the first layer's weight."""

    def __init__(self):
        self.pred_dtypes, self.param_dtypes = set(), set()

    def after_predict(self, learn):
        self.pred_dtypes.add(learn.preds.dtype)
        self.param_dtypes.add(learn.model[0].weight.dtype)


def _fit(cbs, n_epochs=1, lr=1e-2):
    learn = Learner(mlp(), regression_dls(n_train=64, bs=16), lr=lr, cbs=cbs)
    return learn.fit(n_epochs)


def test_cpu_default_is_a_noop_that_prints_one_note(capsys):
    cb = MixedPrecisionCB()
    learn = _fit([cb])
    learn.fit(1)  # a second fit does not repeat the note
    out = capsys.readouterr().out
    assert out.count("MixedPrecisionCB") == 1 and "float32" in out and not cb.active
    plain = _fit([])
    plain.fit(1)
    assert_same_weights(weights(learn.model), weights(plain.model))


def test_forced_cpu_bfloat16_autocasts_predict_but_keeps_fp32_master_weights():
    spy, metrics = DtypeSpy(), MetricsCB()
    learn = _fit([MixedPrecisionCB(enabled=True), spy, metrics], n_epochs=5, lr=5e-2)
    assert spy.pred_dtypes == {torch.bfloat16}
    assert spy.param_dtypes == {torch.float32} and learn.model[0].weight.grad is None
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    train = [r["loss"] for r in metrics.history if r["phase"] == "train"]
    assert train[-1] < 0.5 * train[0]
    assert not torch.is_autocast_enabled("cpu")


def test_float16_uses_a_grad_scaler_that_skips_overflowing_steps():
    cb = MixedPrecisionCB(torch.float16, enabled=True)

    class Snap(Callback):
        order = 5

        def before_step(self, learn):
            self.before = weights(learn.model)
            self.scale = cb.scaler.get_scale()

        def after_step(self, learn):
            if learn.iter == 2:
                self.skipped = weights(learn.model)
                self.skipped_before, self.scale_before = self.before, self.scale

    snap, spy = Snap(), DtypeSpy()
    learn = _fit([cb, PoisonLoss(at=(0, 2), value=float("inf")), snap, spy])
    assert spy.pred_dtypes == {torch.float16}
    assert cb.scaler is not None and cb.scaler.get_scale() == snap.scale_before / 2
    assert_same_weights(snap.skipped, snap.skipped_before)  # the overflowing step changed nothing
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert cb.state_dict()["scale"] == cb.scaler.get_scale()


def test_autocast_is_switched_off_when_a_batch_fails():
    cb = MixedPrecisionCB(enabled=True)
    learn = Learner(mlp(), regression_dls(), cbs=[cb, NaNGuardCB()])
    with pytest.raises(KeyError):
        learn.fit(1, cbs=[RaiseAt("after_predict", KeyError)])
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(TrainingError):
        learn.fit(1, cbs=[PoisonLoss()])
    assert not torch.is_autocast_enabled("cpu")


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="bfloat16 or torch.float16"):
        MixedPrecisionCB(torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_by_default(dtype):
    spy = DtypeSpy()
    cb = MixedPrecisionCB(dtype)
    learn = _fit([DeviceCB("cuda"), cb, spy], n_epochs=2)
    assert cb.active and spy.pred_dtypes == {dtype} and spy.param_dtypes == {torch.float32}
    assert (cb.scaler is not None) == (dtype == torch.float16)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (True, True), (False, False)])
def test_auto_precision_follows_native_cpu_bf16_not_amx(monkeypatch, avx512_bf16, amx):
    # Zen 4 EPYCs have AVX512-bf16 without AMX and train 2-3x faster in bf16; CPUs without it emulate bf16.
    from minidiffusion.device import bf16_is_fast
    from minidiffusion.learner.precision import precision_callback
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert bf16_is_fast(cpu) is avx512_bf16
    name, cb = precision_callback("auto", cpu)
    assert name == ("bf16" if avx512_bf16 else "fp32")
    assert (cb is not None) is avx512_bf16 and (cb is None or cb.dtype == torch.bfloat16)
    assert precision_callback("fp32", cpu) == ("fp32", None)

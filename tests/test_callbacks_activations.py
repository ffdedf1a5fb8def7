"""ActivationStatsCB: layer choice, statistics against a hand computation, plots, hook removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minidiffusion.learner import ActivationStatsCB, Learner, SingleBatchCB, default_layers
from test_learner_helpers import regression_dls


class ResBlock(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return x + self.lin(x).relu()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), ResBlock(8), nn.Sequential(nn.Linear(8, 1)))


def test_default_layers_are_blocks_and_conv_linear_outside_them():
    names = [n for n, _ in default_layers(_model())]
    assert names == ["0", "2", "3.0"]  # ResBlock hooked as a unit, not its inner Linear


def test_stats_of_the_first_batch_match_a_hand_computation():
    model = _model()
    cb = ActivationStatsCB(modules_filter=lambda name, m: isinstance(m, nn.ReLU), eps=0.05, bins=5,
                           hist_range=(0.0, 1.0))
    learn = Learner(model, regression_dls(n_train=32, bs=8, shuffle=False), cbs=[cb])
    x0 = learn.dls.train.tensors[0][:8]
    with torch.no_grad():
        a = model[1](model[0](x0))  # the ReLU output for the first batch, before any step
    learn.fit(1)
    s = cb.stats["1"]
    assert list(cb.stats) == ["1"] and len(s.mean) == 4  # 4 training batches, validation not recorded
    assert s.mean[0].item() == pytest.approx(a.mean().item(), rel=1e-6)
    assert s.std[0].item() == pytest.approx(a.std().item(), rel=1e-6)
    assert s.near_zero[0].item() == pytest.approx((a.abs() < 0.05).float().mean().item())
    assert s.near_zero[0].item() >= 0.3  # a ReLU zeroes about half
    assert torch.equal(s.hist[0], torch.histc(a.abs(), 5, 0.0, 1.0)) and s.hist.shape == (4, 5)


def test_plots_are_written_and_hooks_removed_at_fit_end(tmp_path):
    model = _model()
    cb = ActivationStatsCB()
    Learner(model, regression_dls(n_train=16), cbs=[cb, SingleBatchCB()]).fit(1)  # ends by CancelFit
    assert not any(m._forward_hooks for m in model.modules())
    assert [len(s.mean) for s in cb.stats.values()] == [1, 1, 1]
    for path in (cb.plot_stats(tmp_path / "stats.png"), cb.color_dim(tmp_path / "color_dim.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):  # hooks are removed on errors too
        Learner(model, regression_dls(), cbs=[cb]).fit(1, cbs=[_Fail()])
    assert not any(m._forward_hooks for m in model.modules())


class _Fail(SingleBatchCB):
    def after_batch(self, learn):
        raise KeyError("boom")

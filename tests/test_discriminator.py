"""The patch-GAN discriminator: logit-map shapes, a receptive field of one patch, hinge losses by hand."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.errors import ConfigError
from minidiffusion.nn.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    d_hinge_loss,
    g_hinge_loss,
    receptive_field,
)


@pytest.mark.parametrize("kw, side, out_side", [
    (dict(channels=8), 64, 6),  # 3 strided convs: 64 -> 8, then two 4x4 stride-1 convs: 7, 6
    (dict(channels=8, n_layers=2, norm="none"), 64, 14),
    (dict(channels=8, n_layers=2, norm="group", norm_groups=4, in_channels=1), 32, 6),
])
def test_logit_map_shapes(kw, side, out_side):
    d = PatchDiscriminator(**kw)
    x = torch.rand(2, d.cfg.in_channels, side, side) * 2 - 1
    assert d(x).shape == (2, 1, out_side, out_side)


def test_default_widths_and_receptive_fields():
    cfg = DiscriminatorConfig()
    assert cfg.widths() == [64, 128, 256, 512]
    assert [receptive_field(DiscriminatorConfig(n_layers=n)) for n in (1, 2, 3, 4)] == [16, 34, 70, 142]
    assert DiscriminatorConfig(channels=64, n_layers=5).widths()[-1] == 512  # capped at channels * max_mult


def test_each_logit_sees_one_patch_not_the_whole_image():
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=4, n_layers=2).eval()  # eval: batch statistics would couple all pixels
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = d(x)
    assert out.shape == (1, 1, 14, 14)
    out[0, 0, 7, 7].backward()
    seen = x.grad.abs().sum((0, 1)) > 0
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    rf = receptive_field(d.cfg)
    assert rf == 34 and rows.max() - rows.min() + 1 == rf and cols.max() - cols.min() + 1 == rf
    assert seen.sum() == rf * rf and seen.numel() > 3 * rf * rf


def test_hinge_losses_on_hand_computed_values():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - real) = 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([-3.0, 0.0, 1.5])  # relu(1 + fake) = 0, 1, 2.5 -> mean 7/6
    torch.testing.assert_close(d_hinge_loss(real, fake), torch.tensor(0.5 * (0.625 + 7 / 6)))
    torch.testing.assert_close(g_hinge_loss(fake), torch.tensor(0.5))  # -mean(fake) = -(-1.5 / 3)
    assert d_hinge_loss(torch.full((3,), 1.0), torch.full((3,), -1.0)) == 0  # at the margins: no loss
    assert g_hinge_loss(torch.ones(2, 1, 3, 3)).item() == -1.0


def test_config_refusals():
    with pytest.raises(ConfigError, match=r"n_layers must be an integer in 1\.\.8, got 0"):
        DiscriminatorConfig(n_layers=0)
    with pytest.raises(ConfigError, match=r"channels must be an integer in 1\.\.4096, got -64"):
        DiscriminatorConfig(channels=-64)
    with pytest.raises(ValueError, match="norm must be one of batch, group, none"):
        DiscriminatorConfig(norm="spectral")
    with pytest.raises(ValueError, match="can't split 24 channels into 32 groups"):
        DiscriminatorConfig(channels=12, norm="group")

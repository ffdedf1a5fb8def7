"""The "simple diffusion" middle: transformer blocks over the lowest-resolution map of a U-Net."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.errors import ConfigError
from minidiffusion.nn.transformer import TransformerBlock, TransformerMid
from minidiffusion.nn.unet import UNet, UNetConfig


def test_a_fresh_stack_is_the_identity_and_learns_to_be_more():
    torch.manual_seed(0)
    mid = TransformerMid(32, size=4, n_blocks=2, emb_dim=16, head_dim=8)
    h, emb = torch.randn(3, 32, 4, 4), torch.randn(3, 16)
    assert torch.allclose(mid(h, emb), h, atol=1e-6)
    opt = torch.optim.Adam(mid.parameters(), 1e-2)
    target = h.flip(-1)  # something only attention across positions can do
    first = None
    for _ in range(60):
        loss = (mid(h, emb) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_the_embedding_modulates_each_block():
    torch.manual_seed(0)
    blk = TransformerBlock(16, emb_dim=8, head_dim=8)
    torch.nn.init.normal_(blk.ada.weight, std=0.5)
    x = torch.randn(2, 5, 16)
    a, b = blk(x, torch.zeros(2, 8)), blk(x, torch.ones(2, 8))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_unet_with_a_transformer_middle():
    cfg = UNetConfig(channels=(8, 16), blocks=(1, 1), attention=(False, False), norm_groups=4, head_dim=8,
                     mid_type="transformer", mid_blocks=3, mid_size=4)
    net = UNet(cfg)
    assert sum(isinstance(m, TransformerBlock) for m in net.modules()) == 3
    out = net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert out.shape == (2, 1, 8, 8) and torch.equal(out, torch.zeros_like(out))  # zero output conv at init
    with pytest.raises(ValueError, match="built for 4x4 maps"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="needs mid_size"):
        UNet(UNetConfig(channels=(8, 16), blocks=(1, 1), norm_groups=4, head_dim=8, mid_type="transformer"))


def test_config_refusals():
    from minidiffusion.config import from_dict

    with pytest.raises(ConfigError, match="mid_type must be"):
        from_dict(UNetConfig, {"mid_type": "mamba"})
    with pytest.raises(ConfigError, match="transformer middle splits 128 channels"):
        from_dict(UNetConfig, {"mid_type": "transformer", "head_dim": 48})


def test_the_diffusion_recipe_sizes_the_position_embedding_from_the_data():
    from minidiffusion.config import apply_overrides
    from minidiffusion.recipes.diffusion import DiffusionConfig, TrainingData, resolve_config

    cfg = apply_overrides(DiffusionConfig(), ["model.mid_type=transformer", "conditional=false"])
    resolved = resolve_config(cfg, TrainingData(None, None, 4, 16))
    assert resolved.model.mid_size == 4 and resolved.model.in_channels == 4  # 16 / 2^2

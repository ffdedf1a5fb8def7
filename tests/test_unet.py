"""The diffusion U-Net and its parts: embedding, attention, FiLM ResBlocks, label dropping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minidiffusion.nn.attention import SelfAttention2d
from minidiffusion.nn.embedding import NoiseEmbedding, timestep_embedding
from minidiffusion.nn.unet import EmbResBlock, UNet, UNetConfig, drop_labels

TINY = dict(channels=(8, 16), blocks=(1, 1), norm_groups=4, head_dim=8, mid_blocks=1)


def perturb_zero_inits(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Give every all-zero parameter (the identity inits, GroupNorm biases) small random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(b: int = 3, c: int = 1, h: int = 16, w: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.rand(b, generator=g) * 999


@pytest.mark.parametrize("kw, shape, out_c", [
    (dict(TINY), (2, 1, 16, 16), 1),
    (dict(TINY, attention=()), (2, 1, 16, 16), 1),  # no attention anywhere
    (dict(TINY, attention=(0, 1), in_channels=3, out_channels=6), (2, 3, 8, 24), 6),  # indices, non-square
    (dict(TINY, channels=(8, 16, 16), blocks=(1, 2, 1), attention=(False, True, True), n_classes=10,
          downsample="avgpool", dropout=0.1, mid_blocks=0), (2, 1, 16, 16), 1),
])
def test_shapes(kw, shape, out_c):
    net = UNet(**kw)
    x = torch.randn(shape)
    label = torch.tensor([0, 9]) if kw.get("n_classes") else None
    assert net(x, torch.tensor([0.0, 500.0]), label).shape == (shape[0], out_c, *shape[2:])


def test_default_config_shape_and_zero_output_at_init():
    net = UNet()
    assert net.cfg.attention_levels() == (False, False, True)
    x, t = inputs(2, 1, 32, 32)
    out = net(x, t)
    assert out.shape == (2, 1, 32, 32) and torch.equal(out, torch.zeros_like(out))


def test_config_validation():
    three = dict(channels=(8, 16, 32), blocks=(1, 1, 1))
    assert UNetConfig(**three, attention=(2,)).attention_levels() == (False, False, True)
    assert UNetConfig(**three, attention=(0, -1)).attention_levels() == (True, False, True)
    assert UNetConfig(**three, attention=()).attention_levels() == (False, False, False)
    for bad in [(3,), (True, False), (True, 1, 0)]:
        with pytest.raises(ValueError, match="attention must be 3 booleans"):
            UNetConfig(**three, attention=bad)
    with pytest.raises(ValueError, match="one block count per level"):
        UNetConfig(channels=(8, 16), blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="downsample"):
        UNetConfig(downsample="maxpool")
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(**TINY)(torch.zeros(1, 1, 28, 15), torch.zeros(1))


def test_group_norm_error_names_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"can't split 16 channels into 32 groups.*choose norm_groups"):
        UNet(channels=(16, 32), blocks=(1, 1), norm_groups=32)


def test_label_embedding_null_index():
    net = perturb_zero_inits(UNet(**TINY, n_classes=3))
    assert net.label_emb.num_embeddings == 4  # classes 0..2 and the null label 3
    x, t = inputs(2)
    with torch.no_grad():
        uncond = net(x, t[:2])
        assert torch.equal(uncond, net(x, t[:2], torch.tensor([3, 3])))
        assert not torch.allclose(uncond, net(x, t[:2], torch.tensor([0, 1])), atol=1e-4)
    with pytest.raises(ValueError, match="n_classes > 0"):
        UNet(**TINY)(x, t[:2], torch.tensor([0, 1]))


def test_drop_labels_fraction_and_values():
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    kept = labels.clone()
    out = drop_labels(labels, 0.3, 10, generator=torch.Generator().manual_seed(1))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.015  # 5 standard deviations
    assert torch.equal(out[~dropped], labels[~dropped]) and torch.equal(labels, kept)
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert (drop_labels(labels, 1.0, 10) == 10).all()
    again = drop_labels(labels, 0.3, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="probability"):
        drop_labels(labels, 1.5, 10)


def test_gradient_reaches_every_parameter_after_one_step():
    net = UNet(**TINY, n_classes=2, attention=(0, 1))
    nn.init.normal_(net.out_conv.weight, std=0.05)  # only the output conv: the rest learns its way out
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, eps=1e-5)
    x, t = inputs(3)
    labels = torch.tensor([0, 1, 2])  # every row of the label table, the null label included
    for _ in range(2):
        opt.zero_grad()
        (net(x, t, labels) - x).pow(2).mean().backward()
        opt.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_noise_level_changes_the_output():
    net = perturb_zero_inits(UNet(**TINY))
    x, _ = inputs(2)
    with torch.no_grad():
        for lo, hi in [(10.0, 500.0), (-1.0, 0.5)]:  # DDPM timesteps, EDM's ln(sigma)/4
            a, b = net(x, torch.full((2,), lo)), net(x, torch.full((2,), hi))
            assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_channels_last_and_bf16_autocast_match_fp32():
    net = perturb_zero_inits(UNet(**dict(TINY, attention=(1,)))).eval()
    x, t = inputs(4)
    with torch.no_grad():
        ref = net(x, t)
        net_cl = net.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        out_cl = net_cl(x_cl, t)
        out_mixed = net_cl(x, t)  # an NCHW batch into a channels_last model is converted on entry
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = net_cl(x_cl, t)
    assert ref.abs().mean() > 0.01
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_mixed, ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out_bf).all()
    assert (out_bf.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_timestep_embedding_values_and_scale():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32 and emb.abs().max() <= 1
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([freqs.cos(), freqs.sin()]))
    assert timestep_embedding(t, 7).shape == (3, 7)
    c_noise = torch.tensor([-1.0, -0.9])  # EDM levels: the scale spreads them across frequencies
    torch.testing.assert_close(timestep_embedding(c_noise, 16, scale=250.0),
                               timestep_embedding(c_noise * 250, 16))
    assert NoiseEmbedding(32, n_freq=16)(t).shape == (3, 32)
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_self_attention_is_identity_at_init_and_matches_reference():
    attn = SelfAttention2d(16, head_dim=8, norm_groups=4)
    assert attn.heads == 2
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(attn(x), x)
    nn.init.normal_(attn.proj.weight, std=0.2)
    tok = attn.norm(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 16)
    q, k, v = attn.qkv(tok).chunk(3, dim=-1)
    heads = [torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8), dim=-1) @ v[..., s]
             for s in (slice(0, 8), slice(8, 16))]
    ref = x + attn.proj(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        SelfAttention2d(12, heads=5, norm_groups=4)


def test_emb_resblock_applies_film_modulation():
    blk = EmbResBlock(8, 8, emb_dim=4, norm_groups=2)
    nn.init.normal_(blk.conv2.weight, std=0.1)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    scale, shift = blk.emb(emb)[:, :, None, None].chunk(2, dim=1)
    h = blk.conv1(nn.functional.silu(blk.norm1(x)))
    ref = x + blk.conv2(nn.functional.silu((1 + scale) * blk.norm2(h) + shift))
    torch.testing.assert_close(blk(x, emb), ref)


def test_a_text_conditional_unet_attends_to_real_tokens_only():
    torch.manual_seed(0)
    cfg = UNetConfig(channels=(8, 16), blocks=(1, 1), attention=(False, True), norm_groups=4, head_dim=8,
                     context_dim=12, pooled_dim=12)
    net = UNet(cfg)
    for m in net.modules():  # leave the zero-initialised state, so the text actually changes the output
        if isinstance(m, torch.nn.Conv2d) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, std=0.1)
        if isinstance(m, torch.nn.Linear) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    ctx, pooled = torch.randn(2, 5, 12), torch.randn(2, 12)
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    out = net(x, t, context=ctx, context_mask=mask, pooled=pooled)
    other = ctx.clone()
    other[:, 3:] = 100 * torch.randn(2, 2, 12)  # what sits in padding positions must not matter
    assert torch.allclose(out, net(x, t, context=other, context_mask=mask, pooled=pooled), atol=1e-6)
    changed = ctx.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(out, net(x, t, context=changed, context_mask=mask, pooled=pooled), atol=1e-4)
    with pytest.raises(ValueError, match="attends to text"):
        net(x, t)
    with pytest.raises(ValueError, match="pooled text vector"):
        net(x, t, context=ctx, context_mask=mask)

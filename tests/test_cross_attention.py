"""Cross-attention from a feature map to text tokens: identity at init, masked padding changes nothing, a row
with no real token is left unchanged (no NaN), shapes, channels_last and autocast."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.nn.cross_attention import CrossAttention2d


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight a busy machine's other jobs for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed(block: CrossAttention2d) -> CrossAttention2d:
    """The block with its zero-initialised output projection given random values (so it does something)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        block.proj.weight.copy_(torch.randn(block.proj.weight.shape, generator=g) * 0.1)
        block.proj.bias.copy_(torch.randn(block.proj.bias.shape, generator=g) * 0.1)
    return block


def inputs(b: int = 3, c: int = 16, h: int = 6, w: int = 5, t: int = 7, d: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, t, d, generator=g)


def test_identity_at_init():
    block = CrossAttention2d(16, 12, head_dim=8, norm_groups=4)
    x, ctx = inputs()
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7])
    assert torch.equal(block(x, ctx, mask), x) and torch.equal(block(x, ctx), x)


def test_shapes_heads_and_context_width():
    block = perturbed(CrossAttention2d(16, 12, head_dim=8, norm_groups=4))
    assert block.heads == 2
    x, ctx = inputs(b=2, h=3, w=9, t=1)
    out = block(x, ctx)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    assert CrossAttention2d(8, 384, head_dim=32, norm_groups=4).heads == 1  # fewer channels than a head
    with pytest.raises(ValueError, match=r"expects context \(2, T, 12\)"):
        block(x, torch.randn(2, 4, 10))
    with pytest.raises(ValueError, match="expects a mask"):
        block(x, ctx, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="can't split 16 channels into 3 groups"):
        CrossAttention2d(16, 12, norm_groups=3)
    with pytest.raises(ValueError, match="cannot be split into 2 heads"):
        CrossAttention2d(21, 12, head_dim=8, norm_groups=3)  # 21 // 8 = 2 heads, which 21 channels do not fill


def test_masked_padding_changes_nothing():
    block = perturbed(CrossAttention2d(16, 12, head_dim=8, norm_groups=4))
    x, ctx = inputs()
    lengths = [7, 3, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    out = block(x, ctx, mask)
    junk = torch.where(mask[..., None], ctx, torch.randn(ctx.shape) * 1e3)  # any values where masked
    torch.testing.assert_close(block(x, junk, mask), out, rtol=0, atol=1e-5)
    for i, n in enumerate(lengths):  # the same as a context holding only the real tokens
        torch.testing.assert_close(block(x[i:i + 1], ctx[i:i + 1, :n]), out[i:i + 1], rtol=0, atol=1e-5)
    assert torch.equal(block(x, ctx, torch.ones(3, 7, dtype=torch.bool)), block(x, ctx))


def test_a_row_with_no_real_token_is_left_unchanged():
    block = perturbed(CrossAttention2d(16, 12, head_dim=8, norm_groups=4))
    x, ctx = inputs()
    mask = torch.tensor([[True] * 7, [False] * 7, [True] * 2 + [False] * 5])
    out = block(x, ctx, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], x[1])  # attends to nothing: a zero update
    torch.testing.assert_close(out[[0, 2]], block(x[[0, 2]], ctx[[0, 2]], mask[[0, 2]]), rtol=0, atol=1e-6)


def test_channels_last_input():
    block = perturbed(CrossAttention2d(16, 12, head_dim=8, norm_groups=4))
    x, ctx = inputs()
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 1])[:, None]
    xl = x.contiguous(memory_format=torch.channels_last)
    out, out_l = block(x, ctx, mask), block(xl, ctx, mask)
    torch.testing.assert_close(out_l, out, rtol=0, atol=1e-5)
    assert out_l.is_contiguous(memory_format=torch.channels_last)


def test_gradients_and_bf16_autocast():
    block = perturbed(CrossAttention2d(16, 12, head_dim=8, norm_groups=4))
    x, ctx = inputs()
    ctx.requires_grad_(True)
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 1])[:, None]
    block(x, ctx, mask).square().sum().backward()
    assert ctx.grad is not None and ctx.grad[~mask].abs().max() == 0  # padding gets no gradient either
    assert ctx.grad[mask].abs().max() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, ctx.detach(), mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, block(x, ctx.detach(), mask), rtol=0.05, atol=0.05)

"""The text transformer: shapes, the pooled <end> state, padding that changes nothing, masks without a real token."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.errors import ConfigError
from minidiffusion.nn.text import TextBlock, TextEncoder, TextEncoderConfig

TINY = dict(vocab_size=50, context=16, width=32, layers=2, heads=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight a busy machine's other jobs for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch(lengths=(5, 2, 16), t: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, t) with random real tokens (3..49) where mask is True, pad id 0 elsewhere; mask a prefix."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    ids = torch.randint(3, 50, (len(lengths), t), generator=g) * mask
    return ids, mask


@pytest.fixture(scope="module")
def net() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(**TINY).eval()


def test_shapes_and_pooled_is_the_end_state(net):
    ids, mask = batch()
    states, pooled = net(ids, mask)
    assert states.shape == (3, 16, 32) and pooled.shape == (3, 32) and states.dtype == torch.float32
    for i, n in enumerate((5, 2, 16)):
        assert torch.equal(pooled[i], states[i, n - 1])
    assert net.width == 32 and net(ids[:, :7], mask[:, :7])[0].shape == (3, 7, 32)  # shorter than the context


def test_padding_never_changes_the_real_tokens(net):
    ids, mask = batch()
    states, pooled = net(ids, mask)
    other = torch.where(mask, ids, torch.randint(0, 50, ids.shape, generator=torch.Generator().manual_seed(5)))
    s2, p2 = net(other, mask)  # whatever ids the padding holds
    torch.testing.assert_close(s2[mask], states[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(p2, pooled, rtol=0, atol=1e-6)
    short_ids, short_mask = ids[:2, :6], mask[:2, :6]  # the same prompts, less padding
    s3, p3 = net(short_ids, short_mask)
    torch.testing.assert_close(s3[short_mask], states[:2, :6][short_mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(p3, pooled[:2], rtol=0, atol=1e-5)


def test_without_mask_every_token_is_real(net):
    ids, _ = batch((16, 16, 16))
    full = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(net(ids)[0], net(ids, full)[0])


def test_a_row_without_real_tokens_gives_no_nan(net):
    ids, mask = batch()
    mask[1] = False
    states, pooled = net(ids, mask)
    assert torch.isfinite(states).all() and torch.isfinite(pooled).all()
    torch.testing.assert_close(states[0][mask[0]], net(ids[:1], mask[:1])[0][0][mask[0]], rtol=0, atol=1e-6)


def test_block_respects_the_key_padding_mask():
    torch.manual_seed(1)
    blk = TextBlock(16, 2)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    y = blk(x, mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16) * 100
    torch.testing.assert_close(blk(x2, mask)[:, :4], y[:, :4], rtol=0, atol=1e-5)


def test_trains_and_runs_under_bf16_autocast():
    torch.manual_seed(0)
    net = TextEncoder(**TINY)
    ids, mask = batch()
    _, pooled = net(ids, mask)
    pooled.square().mean().backward()
    assert net.tok.weight.grad is not None and net.pos.grad is not None
    assert net.tok.weight.grad[0].abs().sum() == 0  # the pad id is only ever padding: it gets no gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, pooled = net(ids, mask)
    assert torch.isfinite(states.float()).all()


def test_config_and_input_checks():
    with pytest.raises(ConfigError, match="vocab_size must be an integer"):
        TextEncoderConfig(vocab_size=0)
    with pytest.raises(ConfigError, match="width must be"):
        TextEncoderConfig(vocab_size=10, width=0)
    with pytest.raises(ValueError, match="does not split into 3 heads"):
        TextEncoderConfig(vocab_size=10, width=32, heads=3)
    with pytest.raises(ValueError, match="built for 16 tokens, got 17"):
        TextEncoder(**TINY)(torch.zeros(1, 17, dtype=torch.int64))
    assert TextEncoder(TextEncoderConfig(vocab_size=10, layers=0, width=8, heads=2)).cfg.layers == 0

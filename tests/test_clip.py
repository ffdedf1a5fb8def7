"""The small CLIP: the symmetric InfoNCE loss by hand, shapes and unit norms, the clamped temperature, and a
tiny training run that learns to pair 16 synthetic images with their captions."""

from __future__ import annotations

import math

import pytest
import torch

from minidiffusion.config import from_dict
from minidiffusion.errors import ConfigError
from minidiffusion.nn.clip import CLIP, CLIPConfig, clip_loss
from minidiffusion.nn.resnet import ResNetConfig
from minidiffusion.nn.text import TextEncoderConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight a busy machine's other jobs for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw) -> CLIPConfig:
    return CLIPConfig(text=TextEncoderConfig(vocab_size=40, context=8, width=32, layers=1, heads=2),
                      image=ResNetConfig(in_channels=3, channels=(8, 16), blocks=(1,), dropout=0.0, image_size=16),
                      embed_dim=16, **kw)


def test_loss_by_hand_2x2():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    # rows (image -> text): -log softmax at the diagonal = log(1 + e^-1), log(1 + e^-3)
    # columns (text -> image): [2, 0] picks 2: log(1 + e^-2); [1, 3] picks 3: log(1 + e^-2)
    rows = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2  # 0.1809245
    cols = math.log(1 + math.exp(-2))  # 0.1269280
    assert (rows + cols) / 2 == pytest.approx(0.1539263, abs=1e-7)
    assert clip_loss(logits).item() == pytest.approx(0.1539263, abs=1e-6)


def test_loss_by_hand_3x3():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    rows = [lse(3, 1, 0) - 3, lse(1, 2, 2) - 2, lse(0, 0, 1) - 1]  # 0.16985, 0.86199, 0.55144
    cols = [lse(3, 1, 0) - 3, lse(1, 2, 0) - 2, lse(0, 2, 1) - 1]  # 0.16985, 0.40761, 1.40761
    assert (sum(rows) / 3 + sum(cols) / 3) / 2 == pytest.approx(0.5947239, abs=1e-7)
    assert clip_loss(logits).item() == pytest.approx(0.5947239, abs=1e-6)


def test_aligned_batch_beats_a_shuffled_one():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    aligned = 14.3 * emb @ emb.T
    shuffled = aligned[torch.randperm(8, generator=g)]
    assert clip_loss(aligned) < clip_loss(shuffled)
    assert clip_loss(torch.zeros(8, 8)).item() == pytest.approx(math.log(8))  # no information: chance
    with pytest.raises(ValueError, match="square"):
        clip_loss(torch.zeros(2, 3))


def test_shapes_unit_norms_and_initial_temperature():
    torch.manual_seed(0)
    model = CLIP(tiny_config())
    images, ids = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(3, 40, (4, 8))
    mask = torch.arange(8)[None] < torch.tensor([8, 3, 2, 5])[:, None]
    img, txt = model.encode_image(images), model.encode_text(ids, mask)
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    logits = model(images, ids, mask)
    assert logits.shape == (4, 4)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    torch.testing.assert_close(logits, (img @ txt.T) / 0.07)
    assert "head" not in str(model.image) or isinstance(model.image.head, torch.nn.Identity)


def test_temperature_is_clamped_at_100():
    model = CLIP(tiny_config())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # e^10, far beyond CLIP's cap
    assert model.scale().item() == pytest.approx(100.0)
    images, ids = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randint(3, 40, (2, 8))
    logits = model(images, ids)
    assert logits.abs().max() <= 100.0 + 1e-4
    torch.testing.assert_close(logits, 100 * model.encode_image(images) @ model.encode_text(ids).T)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    assert model.scale().item() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="init_logit_scale"):
        tiny_config(init_logit_scale=5.0)  # above log(100)


def test_config_from_a_dict():
    cfg = from_dict(CLIPConfig, {"text": {"vocab_size": 100}, "embed_dim": 64})
    assert cfg.text.vocab_size == 100 and cfg.image.in_channels == 3 and cfg.image.image_size == 64
    assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    model = CLIP(cfg)
    assert model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, 64)


def test_a_few_steps_learn_16_pairs():
    torch.manual_seed(0)
    model = CLIP(tiny_config())
    g = torch.Generator().manual_seed(0)
    # 16 pairs: image i is a random colour pattern, caption i a random 3..7-token prompt
    images = torch.rand(16, 3, 4, 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3) * 2 - 1
    lengths = torch.randint(3, 8, (16,), generator=g)
    mask = torch.arange(8)[None] < lengths[:, None]
    ids = torch.randint(3, 40, (16, 8), generator=g) * mask
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = clip_loss(model(images, ids, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # about chance, log(16) = 2.77, at the start
    assert losses[-1] < losses[0] / 4, losses
    model.eval()
    with torch.no_grad():
        logits = model(images, ids, mask)
    assert (logits.argmax(1) == torch.arange(16)).float().mean() >= 0.75  # retrieval, image -> caption

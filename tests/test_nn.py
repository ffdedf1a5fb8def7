"""Building blocks and the ResNet classifier: shapes, identity init, dropout semantics, init schemes."""


import numpy as np
import pytest
import torch
from torch import nn

from minidiffusion.nn.init import init_kaiming, lsuv_init, pca_init_
from minidiffusion.nn.layers import ResBlock, conv, group_norm, match_memory_format
from minidiffusion.nn.resnet import ResNet, ResNetConfig


@pytest.mark.parametrize("preact", [False, True])
def test_resblock_is_identity_at_init_when_shapes_agree(preact):
    torch.manual_seed(0)
    blk = ResBlock(8, 8, preact=preact).eval()
    x = torch.randn(4, 8, 6, 6).relu()  # post-act blocks end in ReLU, so use non-negative inputs
    assert torch.allclose(blk(x), x, atol=1e-6)


@pytest.mark.parametrize("preact", [False, True])
def test_resblock_downsamples_and_widens(preact):
    out = ResBlock(8, 16, stride=2, preact=preact)(torch.randn(2, 8, 9, 9))
    assert out.shape == (2, 16, 5, 5)


def test_removed_experiments_load_when_off_and_are_refused_when_on():
    from minidiffusion.config import from_dict
    from minidiffusion.errors import ConfigError

    cfg = from_dict(ResNetConfig, {"channels": [8, 16], "blocks": [1], "se": 0, "ghost_batch": 0, "resize": 0})
    assert cfg.channels == (8, 16) and not hasattr(cfg, "se")  # old run configs hold the "off" values
    for key in ("se", "ghost_batch", "resize"):
        with pytest.raises(ConfigError, match=f"{key}.*removed.*f91f512"):
            from_dict(ResNetConfig, {key: 8})


def test_conv_helper_layers():
    seq = conv(3, 5, ks=5, stride=2, act=nn.SiLU, norm=nn.BatchNorm2d)
    assert isinstance(seq[0], nn.Conv2d) and seq[0].bias is None and seq[0].padding == (2, 2)
    assert isinstance(seq[1], nn.BatchNorm2d) and isinstance(seq[2], nn.SiLU)
    assert seq(torch.randn(1, 3, 8, 8)).shape == (1, 5, 4, 4)
    assert conv(3, 5, norm=None, act=None)[0].bias is not None


def test_group_norm_rejects_impossible_split_with_helpful_message():
    with pytest.raises(ValueError, match="can't split 16 channels into 32 groups"):
        group_norm(16, 32)
    assert group_norm(16, 8).num_groups == 8


def test_dropout2d_drops_whole_channels():
    torch.manual_seed(0)
    d = nn.Dropout2d(0.5).train()
    y = d(torch.ones(64, 16, 5, 5))
    per_channel = y.flatten(2)
    zero = (per_channel == 0).all(-1)
    kept = (per_channel == 2.0).all(-1)  # survivors scaled by 1/(1-p)
    assert bool((zero | kept).all()), "Dropout2d must zero or keep whole channels"
    assert 0.4 < zero.float().mean().item() < 0.6


def test_resnet_shapes_and_features():
    m = ResNet(channels=(8, 16, 32), blocks=(1, 2), dropout=0.0)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert m(x).shape == (3, 10)
    f = m.features(x)
    assert f.shape == (3, 32)
    assert torch.allclose(m.head(f), m(x), atol=1e-6)


def test_resnet_config_validation():
    with pytest.raises(ValueError, match="one block count per stage"):
        ResNetConfig(channels=(8, 16, 32), blocks=(1,))
    with pytest.raises(ValueError, match="act must be one of"):
        ResNetConfig(act="tanh")


def test_resnet_crop_sees_only_the_centre():
    torch.manual_seed(0)
    m = ResNet(channels=(8, 16), blocks=(1,), dropout=0.0, crop=28).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    y = x.clone()
    y[..., :2, :], y[..., -2:, :], y[..., :, :2], y[..., :, -2:] = 1.0, 1.0, 1.0, 1.0  # change the border only
    assert torch.equal(m(x), m(y))
    z = x.clone()
    z[..., 2, 2] = -z[..., 2, 2] + 0.5  # a pixel just inside the crop does matter
    assert not torch.equal(m(x), m(z))
    assert m.features(x).shape == (3, 16)
    with pytest.raises(ValueError, match="larger than the 16x16 input"):
        m(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="crop"):
        ResNetConfig(crop=-1)


def test_resnet_flatten_pool_keeps_position():
    torch.manual_seed(0)
    avg = ResNet(channels=(8, 16, 32), blocks=(1, 1), dropout=0.0).eval()
    flat = ResNet(channels=(8, 16, 32), blocks=(1, 1), dropout=0.0, pool="flatten", crop=28).eval()
    assert avg.n_features == 32 and flat.n_features == 32 * 7 * 7  # 28 -> 14 -> 7
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert flat.features(x).shape == (2, flat.n_features) and flat(x).shape == (2, 10)
    # The flattened features are the last stage's map itself, so where a feature sits is kept.
    h = flat.body(flat._crop(x))
    assert torch.equal(flat.features(x), h.flatten(1))
    assert torch.allclose(avg.features(x), avg.body(x).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="built for 32x32 inputs"):
        ResNet(channels=(8, 16), blocks=(1,), pool="flatten")(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="pool must be"):
        ResNetConfig(pool="max")


def test_resnet_preact_and_dropout2d_variants_train():
    torch.manual_seed(0)
    m = ResNet(channels=(8, 16), blocks=(1,), preact=True, dropout2d=0.1, in_channels=3, n_classes=4)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    opt = torch.optim.AdamW(m.parameters(), 1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_init_kaiming_keeps_zero_inits_and_sets_fan_in_std():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3))
    nn.init.zeros_(m[1].weight)
    init_kaiming(m)
    assert m[1].weight.abs().sum() == 0
    expected = (2 / (64 * 9)) ** 0.5
    assert abs(m[0].weight.std().item() / expected - 1) < 0.05


def test_lsuv_gives_unit_variance_outputs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    xb = torch.randn(64, 1, 8, 8) * 3 + 1
    stats = lsuv_init(m, xb)
    assert len(stats) == 2
    for mean, std in stats:
        assert abs(mean) < 0.05 and abs(std - 1) < 0.05


def _numpy_patch_components(images: torch.Tensor, ks: int) -> np.ndarray:
    """Principal components (rows, by decreasing variance) of the zero-padded ks x ks patches, by SVD in numpy."""
    x = np.pad(images.numpy().astype(np.float64), ((0, 0), (0, 0), (ks // 2,) * 2, (ks // 2,) * 2))
    win = np.lib.stride_tricks.sliding_window_view(x, (ks, ks), axis=(2, 3))  # [N, C, H, W, ks, ks]
    patches = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * ks * ks)
    return np.linalg.svd(patches - patches.mean(0), full_matrices=False)[2]


def test_pca_init_sets_signed_principal_components_and_whitens_after_batchnorm():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 1, 12, 12, generator=g) * 2 - 1
    images = (base + base.roll(1, -1) + 0.5 * base.roll(1, -2)).clamp(-1, 1)  # correlated neighbours
    stem = conv(1, 15, ks=3, act=None)  # odd width: the last component appears with one sign only
    eigvals = pca_init_(stem[0], images)
    w = stem[0].weight.detach().reshape(15, 9).double()
    comps = torch.from_numpy(_numpy_patch_components(images, 3))
    assert eigvals.shape == (9,) and torch.all(eigvals[:-1] >= eigvals[1:])
    for i in range(7):  # the oracle's components, up to their sign, each of norm sqrt(2)
        assert abs(torch.dot(w[2 * i], comps[i])) == pytest.approx(2 ** 0.5, abs=1e-4)
        assert torch.allclose(w[2 * i + 1], -w[2 * i])
    assert abs(torch.dot(w[14], comps[7])) == pytest.approx(2 ** 0.5, abs=1e-4)
    out = stem.train()(images)[:, 0:14:2].transpose(0, 1).reshape(7, -1)  # BatchNorm after the conv
    assert torch.allclose(torch.corrcoef(out), torch.eye(7), atol=0.02)
    assert torch.allclose(out.std(1), torch.ones(7), atol=0.01)


def test_pca_init_refuses_what_it_cannot_fill():
    with pytest.raises(ValueError, match="only 9"):
        pca_init_(nn.Conv2d(1, 20, 3, padding=1), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"images must be \[N, 1, H, W\]"):
        pca_init_(nn.Conv2d(1, 8, 3, padding=1), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="convert uint8 pixels"):
        pca_init_(nn.Conv2d(1, 8, 3, padding=1), torch.full((2, 1, 8, 8), 255.0))
    with pytest.raises(ValueError, match="ungrouped"):
        pca_init_(nn.Conv2d(2, 8, 3, padding=1, groups=2), torch.zeros(2, 2, 8, 8))


def test_resnet_stem_is_the_first_conv_even_after_input_dropout():
    m = ResNet(channels=(8, 16), blocks=(1,), dropout2d=0.1)
    assert m.stem is m.body[1][0] and m.stem.in_channels == 1


def test_channels_last_models_convert_their_input():
    m = ResNet(channels=(8, 16), blocks=(1,)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 4, 4)
    y = match_memory_format(x, m)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert match_memory_format(x, ResNet(channels=(8, 16), blocks=(1,))) is x


def test_resnet_stem_blocks_run_at_full_resolution_and_start_as_identity():
    torch.manual_seed(0)
    m = ResNet(channels=(8, 16, 32), blocks=(1, 1), dropout=0.0, stem_blocks=2).eval()
    base = ResNet(channels=(8, 16, 32), blocks=(1, 1), dropout=0.0)
    assert sum(isinstance(b, ResBlock) for b in m.body) == sum(isinstance(b, ResBlock) for b in base.body) + 2
    seen = []
    stem_blocks = [b for b in m.body if isinstance(b, ResBlock)][:2]
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out))) for b in stem_blocks]
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert m(x).shape == (3, 10) and m.features(x).shape == (3, 32)
    for h in hooks:
        h.remove()
    assert len(seen) == 4  # two blocks, two forward passes
    for inp, out in seen:
        assert out.shape == (3, 8, 32, 32)  # the stem's width, the input's resolution
        assert torch.equal(out, inp)  # zero-initialised residual branch: a fresh block is the identity
    with pytest.raises(ValueError, match="stem_blocks"):
        ResNetConfig(stem_blocks=-1)

"""The convolutional KL autoencoder: shapes for f=4 and f=8, the posterior, scaling, float32 decoding, training."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from minidiffusion.errors import ConfigError
from minidiffusion.nn.attention import SelfAttention2d
from minidiffusion.nn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, latent_scale_factor

TINY = dict(channels=(8, 16, 16), norm_groups=4)  # f = 4


def images(b: int = 2, c: int = 3, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def blobs(n: int = 8, side: int = 16, seed: int = 0) -> torch.Tensor:
    """n smooth colour images in [-1, 1]: a Gaussian blob per channel at a random place and width."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    centre, width = torch.rand(n, 3, 2, generator=g), 0.1 + 0.2 * torch.rand(n, 3, generator=g)
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    return 2 * torch.exp(-d2 / (2 * width[..., None, None] ** 2)) - 1


@pytest.mark.parametrize("channels, latent_side", [((8, 16, 16), 16), ((8, 8, 16, 16), 8)])
def test_shapes_for_f4_and_f8(channels, latent_side):
    vae = AutoencoderKL(channels=channels, norm_groups=4)
    assert vae.downsample_factor == 64 // latent_side
    x = images()
    with torch.no_grad():
        post = vae.encode(x)
        assert post.shape == post.mean.shape == post.logvar.shape == (2, 4, latent_side, latent_side)
        x_hat, post2 = vae(x)
        assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
        assert torch.equal(post2.mean, post.mean)
        assert vae.encode_latents(x).shape == (2, 4, latent_side, latent_side)
        assert vae.decode_latents(post.mode()).shape == x.shape


def test_structure_attention_in_the_middle_and_decoder_depth():
    vae = AutoencoderKL(**TINY, blocks=2)
    attn = [m for m in vae.modules() if isinstance(m, SelfAttention2d)]
    assert len(attn) == 2 and all(a.heads == 1 for a in attn)  # one in each middle, single-head as in SD
    assert attn[0].norm.num_channels == 16
    n_res = [sum(type(m).__name__ == "VAEResBlock" for m in part.modules()) for part in (vae.encoder, vae.decoder)]
    assert n_res == [3 * 2 + 2, 3 * 3 + 2]  # blocks per level (+1 in the decoder), plus the two middle ones
    assert not any(isinstance(m, SelfAttention2d) for m in AutoencoderKL(**TINY, attention=False).modules())
    assert AutoencoderKL(**TINY, downsample="avgpool").encode(images(1)).shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.encode(images(1, side=30))
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 4, 4))


def test_config_refusals():
    with pytest.raises(ValueError, match=r"can't split 8 channels into 32 groups.*choose norm_groups.*\[1, 2, 4, 8\]"):
        VAEConfig(channels=(8, 16))
    with pytest.raises(ValueError, match="channels needs at least one level"):
        VAEConfig(channels=())
    for key, value, words in [("latent_channels", 0, "an integer in 1..256"), ("blocks", -1, "an integer in 1..16"),
                              ("scale_factor", -0.5, "a number > 0"), ("scale_factor", 0.0, "a number > 0"),
                              ("dropout", -0.1, r"a number in \[0, 1\)"),
                              ("channels (each entry)", -8, "an integer in 1..4096")]:
        kw = {"channels": (8, value)} if key.startswith("channels") else {key: value}
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be {words}, got {value}"):
            VAEConfig(**TINY | kw)
    with pytest.raises(ValueError, match="downsample must be 'conv' or 'avgpool'"):
        VAEConfig(downsample="maxpool")


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form():
    zero = torch.zeros(2, 4, 3, 3)
    assert torch.equal(DiagonalGaussian(zero, zero).kl(), torch.zeros(2))
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    post = DiagonalGaussian(mean, logvar)
    ref = torch_kl(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(), ref)
    assert torch.equal(DiagonalGaussian.from_moments(torch.cat([mean, logvar], 1)).logvar, logvar)
    assert torch.equal(post.moments, torch.cat([mean, logvar], 1))
    clamped = DiagonalGaussian(zero, torch.tensor([-100.0, 0.0, 100.0]).expand(2, 4, 3, 3))
    assert clamped.logvar.unique().tolist() == [-30.0, 0.0, 20.0] and torch.isfinite(clamped.var).all()
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussian(zero, zero[:, :2])


def test_sample_is_reproducible_and_has_the_right_moments():
    mean = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(20_000, 2, 1, 1)
    logvar = torch.tensor([math.log(0.25), math.log(4.0)]).view(1, 2, 1, 1).expand_as(mean)  # std 0.5, 2
    post = DiagonalGaussian(mean, logvar)
    a, b = post.sample(torch.Generator().manual_seed(3)), post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.sample(torch.Generator().manual_seed(4)))
    torch.testing.assert_close(a.mean(0).flatten(), torch.tensor([1.5, -2.0]), atol=0.06, rtol=0)  # 4 SEs at std 2
    torch.testing.assert_close(a.std(0).flatten(), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)
    assert torch.equal(post.mode(), mean)


def test_latent_scale_factor_gives_unit_std_and_scaled_helpers_use_it():
    z = 3.0 + 5.0 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = latent_scale_factor(z)
    assert isinstance(s, float) and abs((z * s).std().item() - 1) < 1e-6
    with pytest.raises(ValueError, match="std is 0"):
        latent_scale_factor(torch.ones(2, 4, 2, 2))
    vae = AutoencoderKL(**TINY, scale_factor=0.25).eval()
    x = images(1)
    with torch.no_grad():
        post = vae.encode(x)
        assert torch.equal(vae.encode_latents(x), post.mean * 0.25)
        g = torch.Generator().manual_seed(0)
        assert torch.equal(vae.encode_latents(x, sample=True, generator=g),
                           post.sample(torch.Generator().manual_seed(0)) * 0.25)
        lat = torch.randn(1, 4, 16, 16)
        torch.testing.assert_close(vae.decode_latents(lat), vae.decode(lat / 0.25), rtol=0, atol=0)


def test_decode_latents_is_float32_under_bf16_autocast():
    vae = AutoencoderKL(**TINY).eval()
    lat = torch.randn(1, 4, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert vae.decode(lat).dtype == torch.bfloat16  # what decode_latents protects against
        out = vae.decode_latents(lat.bfloat16())
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, vae.decode(lat.bfloat16().float()))
    with pytest.raises(ValueError, match=r"call \.float\(\)"):
        AutoencoderKL(**TINY).bfloat16().decode_latents(lat)


def test_a_tiny_vae_overfits_eight_blobs():
    torch.manual_seed(0)
    vae = AutoencoderKL(channels=(16, 32), norm_groups=8, attention=True)
    x = blobs(8, 16)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x_hat, post = vae(x, generator=g)
        mse = (x_hat - x).pow(2).mean()
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mse.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]  # about 0.03 here

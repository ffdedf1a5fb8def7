"""The course's MLP autoencoder and VAE: shapes, the reparameterisation, the KL and BCE losses."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from minidiffusion.errors import ConfigError
from minidiffusion.nn.autoencoder import (
    MLPAutoencoder,
    MLPAutoencoderConfig,
    bce_loss,
    kl_divergence,
    kl_divergence_mean,
    logits_to_image,
    mlp_autoencoder_loss,
    reparameterize,
)


def images(b: int = 4, shape=(1, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.rand(b, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("variational", [False, True])
def test_shapes_and_ranges(variational):
    net = MLPAutoencoder(variational=variational)  # the course's 1024 -> 400 -> 200 -> 400 -> 1024
    assert [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)] == \
        [400, 200] + [200] * variational + [400, 1024]
    x = images()
    out = net(x)
    assert out.logits.shape == x.shape and out.z.shape == out.mu.shape == (4, 200)
    assert (out.logvar is None) is not variational
    assert net.encode(x).shape == (4, 200)
    net.eval()  # training-mode BatchNorm over 4 samples amplifies float rounding: compare in eval mode
    img = net.decode(out.z)
    assert img.shape == x.shape and img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(img, logits_to_image(net.decode_logits(out.z)))
    if variational:
        mu, lv = net.encode_stats(x)
        torch.testing.assert_close(mu, net.encode(x))
        torch.testing.assert_close(net(x, sample=False).z, mu)
    else:
        with pytest.raises(ValueError, match="variational=True"):
            net.encode_stats(x)
        torch.testing.assert_close(out.z, out.mu)


def test_other_shapes_and_wrong_input():
    net = MLPAutoencoder(in_shape=(3, 8, 12), hidden=(64, 32), latent=5, variational=True, norm=False)
    assert net(images(2, (3, 8, 12))).logits.shape == (2, 3, 8, 12)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 8, 12\)"):
        net(images(2))


def test_config_refusals():
    with pytest.raises(ConfigError, match=r"latent must be an integer in 1\.\.65536, got 0"):
        MLPAutoencoderConfig(latent=0)
    with pytest.raises(ConfigError, match=r"hidden \(each entry\) must be an integer"):
        MLPAutoencoderConfig(hidden=(400, -1))
    with pytest.raises(ValueError, match=r"in_shape must be \(C, H, W\)"):
        MLPAutoencoderConfig(in_shape=(32, 32))
    with pytest.raises(ConfigError, match=r"in_shape \(each entry\)"):
        MLPAutoencoderConfig(in_shape=(1, 0, 32))


def test_kl_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ref = torch_kl(Normal(mu, (0.5 * lv).exp()), Normal(torch.zeros(()), torch.ones(()))).sum(1)
    torch.testing.assert_close(kl_divergence(mu, lv), ref)
    torch.testing.assert_close(kl_divergence_mean(mu, lv), ref.sum() / mu.numel())
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).eq(0).all()
    assert kl_divergence(mu[:, :, None, None], lv[:, :, None, None]).shape == (5,)  # sums over all but B


def test_reparameterisation_statistics_and_gradients():
    mu, lv = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.0, 2 * torch.tensor(0.5).log()]])  # std 1, 0.5
    z = reparameterize(mu.expand(20_000, 2), lv.expand(20_000, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.03, rtol=0)  # 4 standard errors of the mean
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 0.5]), atol=0.02, rtol=0)
    again = reparameterize(mu.expand(20_000, 2), lv.expand(20_000, 2), torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    mu_g, lv_g = mu.clone().requires_grad_(), lv.clone().requires_grad_()
    reparameterize(mu_g, lv_g).sum().backward()
    assert torch.equal(mu_g.grad, torch.ones_like(mu)) and lv_g.grad.abs().sum() > 0


def test_bce_loss_maps_minus1_1_to_0_1_and_logits_to_image():
    logits = torch.tensor([[0.0, 2.0, -3.0]])
    x = torch.tensor([[-1.0, 1.0, 0.0]])
    p, t = torch.sigmoid(logits), (x + 1) / 2
    ref = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    torch.testing.assert_close(bce_loss(logits, x), ref)
    torch.testing.assert_close(logits_to_image(logits), 2 * torch.sigmoid(logits) - 1)
    assert logits_to_image(torch.tensor([-100.0, 100.0])).tolist() == [-1.0, 1.0]


def test_the_course_loss_trains_a_tiny_vae():
    torch.manual_seed(0)
    net = MLPAutoencoder(in_shape=(1, 8, 8), hidden=(32,), latent=4, variational=True)
    x = (torch.linspace(-1, 1, 8)[None, None, :, None] * torch.linspace(-1, 1, 8)[None, None, None, :]) \
        * torch.linspace(-1, 1, 16)[:, None, None, None]  # 16 smooth images
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = net(x, generator=gen)
        loss = mlp_autoencoder_loss(out, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    t = (x + 1) / 2
    floor = -(t * t.clamp_min(1e-12).log() + (1 - t) * (1 - t).clamp_min(1e-12).log()).mean().item()
    assert losses[-1] - floor < 0.3 * (losses[0] - floor)  # BCE on grey targets cannot go below their entropy
    out = net(x, generator=gen)
    torch.testing.assert_close(mlp_autoencoder_loss(out, x),
                               bce_loss(out.logits, x) + kl_divergence_mean(out.mu, out.logvar))

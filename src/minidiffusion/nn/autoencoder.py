"""The course's MLP autoencoder and MLP variational autoencoder (VAE) for Fashion-MNIST-sized images.

Shape walk for the default config (in_shape=(1, 32, 32), hidden=(400,), latent=200):

    encode   flatten 1*32*32 = 1024 -> Linear, SiLU, BatchNorm1d -> 400 -> Linear -> 200   (B, 200)
             (VAE: two Linear heads 400 -> 200, the mean mu and the log-variance lv)
    decode   200 -> Linear, SiLU, BatchNorm1d -> 400 -> Linear -> 1024 -> unflatten     (B, 1, 32, 32)

The decoder's last layer has no activation: it gives *logits*, one per pixel, which the course
trains with binary cross-entropy against pixels in [0, 1] (`bce_loss` maps our [-1, 1] images
there). `logits_to_image` turns logits into a [-1, 1] image, 2 * sigmoid(logits) - 1.

The VAE samples its code by reparameterisation, z = mu + exp(0.5 * lv) * eps with eps ~ N(0, I),
so gradients reach mu and lv; its KL term pulls q(z | x) = N(mu, exp(lv)) towards N(0, I)
(Kingma & Welling 2014). The course averaged the KL over every element (`kl_divergence_mean`)
rather than summing it per image (`kl_divergence`), which weights it far below the BCE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number

__all__ = ["MLPAutoencoderConfig", "MLPAutoencoder", "MLPAutoencoderOutput", "reparameterize", "kl_divergence",
           "kl_divergence_mean", "bce_loss", "logits_to_image", "mlp_autoencoder_loss"]


@dataclass
class MLPAutoencoderConfig:
    """Architecture of `MLPAutoencoder`: flatten C*H*W -> hidden widths -> latent, and back in reverse."""

    in_shape: tuple[int, ...] = (1, 32, 32)  # (C, H, W) of the images
    hidden: tuple[int, ...] = (400,)  # widths of the hidden layers, encoder order (the decoder reverses them)
    latent: int = 200  # size of the code z
    variational: bool = False  # True: a VAE, with mean and log-variance heads and a sampled code
    norm: bool = True  # BatchNorm1d after each hidden activation (the course's `lin`)

    def __post_init__(self):
        self.in_shape, self.hidden = tuple(self.in_shape), tuple(self.hidden)
        if len(self.in_shape) != 3:
            raise ValueError(f"MLPAutoencoderConfig: in_shape must be (C, H, W), got {list(self.in_shape)}")
        for s in self.in_shape:
            check_number("in_shape (each entry)", s, lo=1, hi=4096, integer=True)
        for h in self.hidden:
            check_number("hidden (each entry)", h, lo=1, hi=65_536, integer=True)
        check_number("latent", self.latent, lo=1, hi=65_536, integer=True)
        if not isinstance(self.variational, bool) or not isinstance(self.norm, bool):
            raise ValueError(f"MLPAutoencoderConfig: variational and norm must be true or false, got "
                             f"{self.variational!r} and {self.norm!r}")

    @property
    def n_pixels(self) -> int:
        """C * H * W: the length of a flattened image."""
        return math.prod(self.in_shape)


class MLPAutoencoderOutput(NamedTuple):
    """What `MLPAutoencoder.forward` returns.

    logits: (B, C, H, W), unbounded (decoder output before the sigmoid);
    z: (B, latent), the code that was decoded (a sample for a VAE);
    mu: (B, latent), the mean code (equal to z for a plain autoencoder);
    logvar: (B, latent) log-variance of q(z | x) for a VAE, None for a plain autoencoder.
    """

    logits: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor | None


def _lin(ni: int, nf: int, norm: bool) -> nn.Sequential:
    """Linear, SiLU, then BatchNorm1d (the course's order): (B, ni) -> (B, nf)."""
    layers: list[nn.Module] = [nn.Linear(ni, nf), nn.SiLU()]
    if norm:
        layers.append(nn.BatchNorm1d(nf))
    return nn.Sequential(*layers)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) drawn from `generator`: shaped like mu, unbounded."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Return KL(N(mu, exp(logvar)) || N(0, I)) per sample, -0.5 * sum(1 + lv - mu^2 - exp(lv)): (B,), >= 0."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)


def kl_divergence_mean(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Return the course's KL term, -0.5 * mean(1 + lv - mu^2 - exp(lv)) over every element: a scalar >= 0."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()


def bce_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return the mean binary cross-entropy of `logits` against x in [-1, 1] mapped to [0, 1]: a scalar >= 0."""
    return F.binary_cross_entropy_with_logits(logits, (x + 1) / 2)


def logits_to_image(logits: torch.Tensor) -> torch.Tensor:
    """Return 2 * sigmoid(logits) - 1: the decoded image, shaped like logits, in [-1, 1]."""
    return torch.tanh(logits / 2)  # the same function, without sigmoid's cancellation near 1


def mlp_autoencoder_loss(out: MLPAutoencoderOutput, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """Return the course's loss, BCE + kl_weight * KL (mean per element; no KL without logvar): a scalar >= 0."""
    loss = bce_loss(out.logits, x)
    if out.logvar is not None:
        loss = loss + kl_weight * kl_divergence_mean(out.mu, out.logvar)
    return loss


class MLPAutoencoder(nn.Module):
    """MLP (variational) autoencoder: images (B, C, H, W) in [-1, 1] -> codes (B, latent) -> logits (B, C, H, W).

    `encode` gives the code (the mean for a VAE), `encode_stats` a VAE's (mu, logvar), `decode_logits`
    unbounded logits and `decode` images in [-1, 1].
    """

    def __init__(self, cfg: MLPAutoencoderConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or MLPAutoencoderConfig(**kwargs)
        widths = (cfg.n_pixels, *cfg.hidden)
        self.encoder = nn.Sequential(*(_lin(a, b, cfg.norm) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.mu = nn.Linear(widths[-1], cfg.latent)
        self.logvar = nn.Linear(widths[-1], cfg.latent) if cfg.variational else None
        back = (cfg.latent, *reversed(cfg.hidden))
        self.decoder = nn.Sequential(*(_lin(a, b, cfg.norm) for a, b in zip(back[:-1], back[1:], strict=True)),
                                     nn.Linear(back[-1], cfg.n_pixels))

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.cfg.in_shape:
            raise ValueError(f"MLPAutoencoder: expected images of shape (B, {', '.join(map(str, self.cfg.in_shape))}),"
                             f" got {tuple(x.shape)}; build it with in_shape matching the data")

    def encode_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a VAE's (mu, logvar) of q(z | x): two (B, latent) tensors, unbounded."""
        if self.logvar is None:
            raise ValueError("MLPAutoencoder: encode_stats needs a VAE; build it with variational=True")
        self._check(x)
        h = self.encoder(x.flatten(1))
        return self.mu(h), self.logvar(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Return the deterministic code of x in [-1, 1] (a VAE's mean mu): (B, latent), unbounded."""
        self._check(x)
        return self.mu(self.encoder(x.flatten(1)))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Return the decoder's per-pixel logits for codes z (B, latent): (B, C, H, W), unbounded."""
        return self.decoder(z).unflatten(1, self.cfg.in_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return the images decoded from codes z (B, latent): (B, C, H, W) in [-1, 1]."""
        return logits_to_image(self.decode_logits(z))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> MLPAutoencoderOutput:
        """Return (logits (B, C, H, W) unbounded, z, mu, logvar); a VAE decodes a sample unless sample=False."""
        if self.logvar is None:
            z = self.encode(x)
            return MLPAutoencoderOutput(self.decode_logits(z), z, z, None)
        mu, logvar = self.encode_stats(x)
        z = reparameterize(mu, logvar, generator) if sample else mu
        return MLPAutoencoderOutput(self.decode_logits(z), z, mu, logvar)

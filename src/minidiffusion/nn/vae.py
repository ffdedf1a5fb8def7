"""A convolutional KL autoencoder: the Stable Diffusion VAE's design (Rombach et al. 2022) at small scale.

Images (B, C, H, W) in [-1, 1] are compressed f = 2 ** (levels - 1) times per side into a diagonal
Gaussian over latents (B, latent_channels, H/f, W/f); a latent diffusion model works on those.
Shape walk for the default config (channels=(64, 128, 256), blocks=1, 3x64x64 input, f=4):

    encoder  3x3 conv 3->64                                           (B, 64, 64, 64)
             L0: 1 ResBlock; strided 3x3 conv                          (B, 64, 32, 32)
             L1: 1 ResBlock 64->128; strided 3x3 conv                  (B, 128, 16, 16)
             L2: 1 ResBlock 128->256                                   (B, 256, 16, 16)
             mid: ResBlock, self-attention (one head), ResBlock        (B, 256, 16, 16)
             GroupNorm, SiLU, 1x1 conv 256->2*4: mean, log-variance    (B, 8, 16, 16)
    decoder  3x3 conv 4->256, mid: ResBlock, attention, ResBlock       (B, 256, 16, 16)
             L2: 2 ResBlocks; 2x nearest, 3x3 conv                     (B, 256, 32, 32)
             L1: 2 ResBlocks 256->128; 2x nearest, 3x3 conv            (B, 128, 64, 64)
             L0: 2 ResBlocks 128->64                                   (B, 64, 64, 64)
             GroupNorm, SiLU, 3x3 conv 64->3                           (B, 3, 64, 64)

As in SD, the decoder has one more ResBlock per level than the encoder (reconstruction quality lives
there). SD's extra 1x1 `quant_conv` / `post_quant_conv` pairs are folded into the neighbouring convs.
The latents `encode` returns are unscaled; a diffusion model wants unit-variance latents, so
`encode_latents` multiplies by `cfg.scale_factor` (SD's 0.18215), which `latent_scale_factor`
computes from a batch of training latents, and `decode_latents` divides it back out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number
from .attention import SelfAttention2d
from .layers import group_norm, match_memory_format

__all__ = ["VAEConfig", "VAEResBlock", "DiagonalGaussian", "AutoencoderKL", "decode_float32", "latent_scale_factor"]


@dataclass
class VAEConfig:
    """Architecture of `AutoencoderKL`: one level per entry of `channels`, each below the first halving the side."""

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256)  # width of each level; f = 2 ** (len(channels) - 1)
    blocks: int = 1  # encoder ResBlocks per level (the decoder has blocks + 1)
    attention: bool = True  # a self-attention block in the middle, at the lowest resolution
    norm_groups: int = 32  # GroupNorm groups; must divide every entry of channels
    scale_factor: float = 1.0  # encode_latents multiplies by it, decode_latents divides (see latent_scale_factor)
    dropout: float = 0.0  # inside each ResBlock, before its second conv
    downsample: str = "conv"  # "conv": strided 3x3 conv; "avgpool": 2x2 average then 3x3 conv

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if not self.channels:
            raise ValueError("VAEConfig: channels needs at least one level, e.g. [64, 128, 256]")
        for c in self.channels:
            check_number("channels (each entry)", c, lo=1, hi=4096, integer=True)
        check_number("in_channels", self.in_channels, lo=1, hi=64, integer=True)
        check_number("latent_channels", self.latent_channels, lo=1, hi=256, integer=True)
        check_number("blocks", self.blocks, lo=1, hi=16, integer=True)
        check_number("norm_groups", self.norm_groups, lo=1, hi=4096, integer=True)
        check_number("scale_factor", self.scale_factor, lo=0.0, lo_open=True)
        check_number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        if not isinstance(self.attention, bool):
            raise ValueError(f"VAEConfig: attention must be true or false, got {self.attention!r}")
        if self.downsample not in ("conv", "avgpool"):
            raise ValueError(f"VAEConfig: downsample must be 'conv' or 'avgpool', got {self.downsample!r}")
        for c in self.channels:  # fail now, with the fix, rather than deep inside the construction
            group_norm(c, self.norm_groups)

    @property
    def downsample_factor(self) -> int:
        """f: image sides are f times the latent sides (and must be multiples of f)."""
        return 2 ** (len(self.channels) - 1)


class VAEResBlock(nn.Module):
    """Pre-activation ResBlock, skip(x) + conv(dropout(SiLU(GN(conv(SiLU(GN(x))))))), skip a 1x1 conv if ni != nf.

    Returns: (B, nf, H, W), unbounded.
    """

    def __init__(self, ni: int, nf: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(ni, norm_groups), nn.Conv2d(ni, nf, 3, padding=1)
        self.norm2, self.drop = group_norm(nf, norm_groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)
        self.skip = nn.Conv2d(ni, nf, 1) if ni != nf else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class DiagonalGaussian:
    """A diagonal Gaussian over latents, N(mean, exp(logvar)), as the encoder's posterior q(z | x).

    `logvar` is clamped to [-30, 20] (as SD does) so std and var stay finite; every tensor is shaped
    like `mean`, (B, C, h, w).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"DiagonalGaussian: mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} "
                             "must have the same shape")
        self.mean, self.logvar = mean, torch.clamp(logvar, -30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Return the Gaussian whose mean and log-variance are the two halves of moments' channels (B, 2C, h, w)."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def moments(self) -> torch.Tensor:
        """Return cat(mean, logvar) along channels, what `from_moments` reads: (B, 2C, h, w)."""
        return torch.cat([self.mean, self.logvar], dim=1)

    @property
    def shape(self) -> torch.Size:
        """The latents' shape, (B, C, h, w)."""
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return mean + std * eps, eps ~ N(0, I) drawn from `generator`: shaped like mean, unbounded."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """Return the most likely latents, the mean: (B, C, h, w), unbounded."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """Return KL(self || N(0, I)) per sample, 0.5 * sum(mean^2 + var - 1 - logvar) over C, h, w: (B,), >= 0."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _downsample(ch: int, kind: str) -> nn.Module:
    if kind == "avgpool":
        return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(ch, ch, 3, padding=1))
    return nn.Conv2d(ch, ch, 3, stride=2, padding=1)


class _Upsample(nn.Module):
    """2x nearest-neighbour upsampling, then a 3x3 conv ni -> nf: (B, ni, H, W) -> (B, nf, 2H, 2W)."""

    def __init__(self, ni: int, nf: int):
        super().__init__()
        self.conv = nn.Conv2d(ni, nf, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, cfg: VAEConfig) -> nn.Sequential:
    """ResBlock, single-head self-attention (if cfg.attention), ResBlock, at the lowest resolution."""
    attn = SelfAttention2d(ch, head_dim=None, norm_groups=cfg.norm_groups) if cfg.attention else nn.Identity()
    return nn.Sequential(VAEResBlock(ch, ch, cfg.norm_groups, cfg.dropout), attn,
                         VAEResBlock(ch, ch, cfg.norm_groups, cfg.dropout))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: images (B, C, H, W) in [-1, 1] <-> latents (B, latent_channels, H/f, W/f).

    `encode` returns the posterior (a `DiagonalGaussian` over unscaled latents); `decode` returns
    images, unbounded but trained towards [-1, 1]. H and W must be multiples of `downsample_factor`.
    """

    def __init__(self, cfg: VAEConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig(**kwargs)
        ch, g, p = cfg.channels, cfg.norm_groups, cfg.dropout
        enc: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        for i, nf in enumerate(ch):
            enc += [VAEResBlock(ch[max(i - 1, 0)] if j == 0 else nf, nf, g, p) for j in range(cfg.blocks)]
            if i < len(ch) - 1:
                enc.append(_downsample(nf, cfg.downsample))
        enc += [_mid(ch[-1], cfg), group_norm(ch[-1], g), nn.SiLU(), nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1), _mid(ch[-1], cfg)]
        ni = ch[-1]
        for i in reversed(range(len(ch))):
            dec += [VAEResBlock(ni if j == 0 else ch[i], ch[i], g, p) for j in range(cfg.blocks + 1)]
            ni = ch[i]
            if i > 0:
                dec.append(_Upsample(ch[i], ch[i]))
        dec += [group_norm(ch[0], g), nn.SiLU(), nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def downsample_factor(self) -> int:
        """f: latents are (H/f, W/f) for images (H, W)."""
        return self.cfg.downsample_factor

    @property
    def scale_factor(self) -> float:
        """The factor `encode_latents` multiplies latents by (cfg.scale_factor)."""
        return self.cfg.scale_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Return q(z | x) for images x (B, C, H, W) in [-1, 1]: a DiagonalGaussian over (B, latent_ch, H/f, W/f)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"AutoencoderKL: expected images (B, {self.cfg.in_channels}, H, W) with H and W "
                             f"divisible by {f}, got {tuple(x.shape)}; pad or crop the images")
        return DiagonalGaussian.from_moments(self.encoder(match_memory_format(x, self)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return images for unscaled latents z (B, latent_channels, h, w): (B, C, h*f, w*f), unbounded (~[-1, 1])."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"AutoencoderKL: expected latents (B, {self.cfg.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.decoder(match_memory_format(z, self.decoder))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Return (x_hat (B, C, H, W) unbounded, posterior); x_hat decodes a sample, or the mean if sample=False."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Return scaled latents z * scale_factor (the mean, or a sample): (B, latent_channels, H/f, W/f)."""
        posterior = self.encode(x)
        return (posterior.sample(generator) if sample else posterior.mode()) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Return images decode(latents / scale_factor), computed in float32 even under autocast: (B, C, H, W)."""
        return decode_float32(self.decode, latents / self.scale_factor, self)


def decode_float32(decode, z: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Return decode(z) with z in float32 and autocast off (low-precision VAE decoders overflow): float32 images."""
    dtype = next(module.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"{type(module).__name__}: decode_latents runs in float32 but the weights are {dtype}; "
                         "call .float() on the model")
    with torch.autocast(z.device.type, enabled=False):
        return decode(z.float()).float()


def latent_scale_factor(latents_unscaled: torch.Tensor) -> float:
    """Return 1 / std of a batch of unscaled training latents: the scale_factor that gives them unit std, > 0."""
    std = latents_unscaled.detach().double().std().item()
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"latent_scale_factor: the latents' std is {std}; give a batch of varied, finite latents")
    return 1.0 / std

"""A patch-GAN discriminator (pix2pix, Isola et al. 2017; SD's "NLayerDiscriminator") and hinge losses.

Instead of one real/fake verdict per image it gives a map of logits, one per overlapping patch:
each output pixel sees only `receptive_field(cfg)` x `receptive_field(cfg)` input pixels (70 for
the default n_layers=3), so it judges local texture and sharpness, which is what an autoencoder
trained on pixel losses alone blurs. Shape walk for the default config on a 3x64x64 image:

    4x4 conv stride 2, 3->64, LeakyReLU(0.2)                      (B, 64, 32, 32)
    4x4 conv stride 2, 64->128, norm, LeakyReLU(0.2)              (B, 128, 16, 16)
    4x4 conv stride 2, 128->256, norm, LeakyReLU(0.2)             (B, 256, 8, 8)
    4x4 conv stride 1, 256->512, norm, LeakyReLU(0.2)             (B, 512, 7, 7)
    4x4 conv stride 1, 512->1: a logit per patch                  (B, 1, 6, 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number
from .layers import group_norm

__all__ = ["DiscriminatorConfig", "PatchDiscriminator", "receptive_field", "d_hinge_loss", "g_hinge_loss"]

NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    """Architecture of `PatchDiscriminator`: n_layers strided 4x4 convs, then two stride-1 ones."""

    in_channels: int = 3
    channels: int = 64  # width of the first conv; each further conv doubles it, up to channels * max_mult
    n_layers: int = 3  # strided convs; the receptive field is 70 pixels for 3, 34 for 2, 142 for 4
    max_mult: int = 8
    norm: str = "batch"  # "batch" (pix2pix, SD), "group" (norm_groups groups) or "none"
    norm_groups: int = 32

    def __post_init__(self):
        check_number("in_channels", self.in_channels, lo=1, hi=64, integer=True)
        check_number("channels", self.channels, lo=1, hi=4096, integer=True)
        check_number("n_layers", self.n_layers, lo=1, hi=8, integer=True)
        check_number("max_mult", self.max_mult, lo=1, hi=64, integer=True)
        check_number("norm_groups", self.norm_groups, lo=1, hi=4096, integer=True)
        if self.norm not in NORMS:
            raise ValueError(f"DiscriminatorConfig: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.norm == "group":
            for c in self.widths()[1:]:
                group_norm(c, self.norm_groups)

    def widths(self) -> list[int]:
        """Return the output width of every conv but the last: n_layers + 1 entries."""
        return [self.channels * min(2 ** i, self.max_mult) for i in range(self.n_layers + 1)]


def receptive_field(cfg: DiscriminatorConfig) -> int:
    """Return the side, in input pixels, of the patch each output logit sees: an integer > 4."""
    rf = 1
    for stride in reversed([2] * cfg.n_layers + [1, 1]):  # every conv is 4x4
        rf = (rf - 1) * stride + 4
    return rf


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> real/fake logits (B, 1, h, w), one per patch, unbounded.

    h = H / 2^n_layers - 2 (for H divisible by 2^n_layers); the first conv has no norm, as in pix2pix.
    """

    def __init__(self, cfg: DiscriminatorConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or DiscriminatorConfig(**kwargs)
        w = cfg.widths()
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, w[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.n_layers + 1):
            stride = 2 if i < cfg.n_layers else 1
            layers += [nn.Conv2d(w[i - 1], w[i], 4, stride=stride, padding=1, bias=cfg.norm != "batch"),
                       self._norm(w[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(w[-1], 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix's init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def _norm(self, ch: int) -> nn.Module:
        if self.cfg.norm == "batch":
            return nn.BatchNorm2d(ch)
        return group_norm(ch, self.cfg.norm_groups) if self.cfg.norm == "group" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Return the discriminator's hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): a scalar >= 0."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def g_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Return the generator's hinge loss -mean(fake_logits): a scalar, unbounded (lower: fakes look real)."""
    return -fake_logits.mean()

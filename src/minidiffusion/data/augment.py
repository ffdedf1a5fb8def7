"""Batch augmentation on whole tensors, on the training device (no per-item Python).

Every function takes a batch [B, C, H, W] in [-1, 1] and an optional torch.Generator,
and returns a new batch of the same shape. A generator on the batch's device makes
runs reproducible; with none, torch's global RNG is used (and restored on resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["random_crop", "random_flip", "random_erase", "BatchAugment"]


def _rand(shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=x.device)


def random_crop(x: torch.Tensor, pad: int = 2, fill: float = -1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Return x padded by `pad` on each side with `fill`, then cropped back at a random offset per image."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=fill)
    off = (_rand((2, b), x, generator) * (2 * pad + 1)).long().clamp_(max=2 * pad)  # [2, B] in 0..2*pad
    rows = (torch.arange(h, device=x.device) + off[0, :, None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (torch.arange(w, device=x.device) + off[1, :, None])[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def random_flip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return x with each image mirrored left-right with probability p."""
    which = _rand((x.shape[0],), x, generator) < p
    return torch.where(which.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def random_erase(x: torch.Tensor, p: float = 0.25, scale: tuple[float, float] = (0.02, 0.2),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Return x where, with probability p per image, one random rectangle is replaced by noise.

    The noise has the batch's mean and std (the course's "fill with N(0, 1) after normalisation",
    in our [-1, 1] units) and is clamped to [-1, 1]. The rectangle's area is a `scale` fraction of
    the image, its aspect ratio log-uniform in [1/3, 3].
    """
    b, c, h, w = x.shape
    r = _rand((5, b), x, generator)
    area = (scale[0] + (scale[1] - scale[0]) * r[0]) * h * w
    aspect = torch.exp((r[1] * 2 - 1) * torch.log(torch.tensor(3.0, device=x.device)))
    eh = (area * aspect).sqrt().clamp(1, h)
    ew = (area / aspect).sqrt().clamp(1, w)
    top, left = r[2] * (h - eh), r[3] * (w - ew)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None])
              & (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None]))
    mask = (inside & (r[4] < p)[:, None, None])[:, None]  # (B, 1, H, W)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = (noise * x.std() + x.mean()).clamp(-1, 1)
    return torch.where(mask, noise, x)


@dataclass
class BatchAugment:
    """Pad + random crop, horizontal flip, then random erasing; call it on a batch in [-1, 1].

    `fill` is the padding value: the background -1 for images, 0 for normalised latents.
    """

    pad: int = 2
    flip: float = 0.5
    erase: float = 0.0
    generator: torch.Generator | None = None
    fill: float = -1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = random_crop(x, self.pad, fill=self.fill, generator=self.generator)
        if self.flip:
            x = random_flip(x, self.flip, generator=self.generator)
        if self.erase:
            x = random_erase(x, self.erase, generator=self.generator)
        return x

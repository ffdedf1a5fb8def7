"""Noise-level embedding: sinusoidal features of a float per image, then an MLP (Ho et al. 2020, sec. 4).

What the U-Net is told about the noise belongs to the training objective, not to the network
(see `diffusion/objectives.py`), so the same embedding must serve very different scales:

    objective          noise_level                       typical range      suggested `scale`
    DDPM               timestep t                        0 .. 999           1
    Cosine             time_scale * t, t in [0, 1)       0 .. 1 (scale 1)   1000 (or time_scale=1000)
    EDM                c_noise = ln(sigma) / 4           about -1.6 .. 1.1  250

With the transformer's frequencies 1/max_period .. 1 a DDPM timestep sweeps every feature through
many periods, while a level of size ~1 only turns the fastest few: the slow features are nearly
linear in it. That still trains (EDM feeds ln(sigma)/4 to exactly this embedding), but multiplying
by `scale` first spreads a small-range level over the whole frequency band; `UNetConfig.noise_level_scale`
passes it through. The scale is a property of the objective and must stay fixed for a trained network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["timestep_embedding", "NoiseEmbedding"]


def timestep_embedding(noise_level: torch.Tensor, dim: int, max_period: float = 10000.0,
                       scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features [cos(s t f_i), sin(s t f_i)] with f_i = max_period^(-i/half), i < dim/2.

    noise_level: float (B,) (any scale, see the module docstring); s = `scale`.
    Returns: float32 (B, dim) in [-1, 1] (cosines first; a zero column pads an odd dim).
    Computed in float32 whatever the input dtype: bf16 cannot even represent timestep 999 exactly.
    """
    if noise_level.ndim != 1:
        raise ValueError(f"timestep_embedding: noise_level must be a (B,) tensor, got shape "
                         f"{tuple(noise_level.shape)}; pass one float per image")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half *
                      torch.arange(half, dtype=torch.float32, device=noise_level.device))
    phase = (noise_level.float() * scale)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([phase.cos(), phase.sin()], dim=1)  # (B, 2 * half)
    return nn.functional.pad(emb, (0, dim % 2))


class NoiseEmbedding(nn.Module):
    """Noise level (B,) -> sinusoidal features (B, n_freq) -> Linear, SiLU, Linear -> (B, dim).

    Returns: (B, dim) float32 (bf16 under autocast), unbounded, one vector per image that every
    ResBlock turns into its own scale and shift.
    """

    def __init__(self, dim: int, n_freq: int | None = None, max_period: float = 10000.0, scale: float = 1.0):
        super().__init__()
        self.n_freq, self.max_period, self.scale = n_freq or dim, max_period, scale
        self.mlp = nn.Sequential(nn.Linear(self.n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(noise_level, self.n_freq, self.max_period, self.scale))

    def extra_repr(self) -> str:
        return f"n_freq={self.n_freq}, max_period={self.max_period}, scale={self.scale}"

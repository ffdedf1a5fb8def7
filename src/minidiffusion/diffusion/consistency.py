"""Consistency models (Song et al. 2023; Song & Dhariwal 2023, "iCT"): a denoiser that jumps to x0 in one step.

A consistency function f(x, sigma) maps every point of a probability-flow ODE trajectory to the
trajectory's end, with the boundary condition f(x, sigma_min) = x built into its parametrisation
(Song et al. 2023, App. C; EDM's c_in and c_noise, so an EDM network is a good start):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise),
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),   c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2).

Consistency distillation trains f so that adjacent points of a teacher's ODE trajectory map to the
same x0: with sigmas sigma_1 < ... < sigma_N (Karras' rho = 7 grid), n uniform in 1..N-1,

    loss = lambda_n d(f(x0 + sigma_{n+1} z, sigma_{n+1}), stopgrad f(x_hat_n, sigma_n)),

x_hat_n one teacher ODE step (Heun) from sigma_{n+1} down to sigma_n, d the pseudo-Huber distance
sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) and lambda_n = 1 / (sigma_{n+1} - sigma_n)
(iCT's improvements), and the target the student itself without gradient (no EMA teacher).
Sampling (`sample_consistency` in samplers.py): x0 = f(sigma_max z); for each further sigma,
re-noise x0 to it and jump again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from .objectives import Objective, _bc, edm_scalings
from .schedules import sigmas_karras

__all__ = ["consistency_scalings", "ConsistencyObjective", "pseudo_huber", "consistency_grid", "heun_step"]


def consistency_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor]:
    """Return (c_skip, c_out) shaped like sigma; c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly."""
    sigma = torch.as_tensor(sigma)
    d = sigma - torch.tensor(sigma_min, dtype=sigma.dtype)  # in sigma's dtype: exactly 0 at sigma_min
    return sigma_data**2 / (d**2 + sigma_data**2), sigma_data * d / (sigma_data**2 + sigma**2).sqrt()


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """Return the pseudo-Huber distance per sample (B,): sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim)."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).float().pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def consistency_grid(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Return the N distillation sigmas, ascending: Karras' rho = 7 grid from sigma_min to sigma_max. float64 [N]."""
    if n < 2:
        raise ConfigError(f"the consistency grid needs at least 2 sigmas, got {n}")
    return sigmas_karras(n, sigma_min, sigma_max)[:-1].flip(0)


def heun_step(denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, **cond) -> Tensor:
    """One Heun step of the probability-flow ODE from sigma down to sigma_next (both (B,) > 0). Returns like x."""
    s, s2 = _bc(sigma, x), _bc(sigma_next, x)
    d = (x - denoiser(x, sigma, **cond)) / s
    x_next = x + (s2 - s) * d
    d2 = (x_next - denoiser(x_next, sigma_next, **cond)) / s2
    return x + (s2 - s) * (d + d2) / 2


class ConsistencyObjective(Objective):
    """A consistency model's denoiser: f(x, sigma) with the boundary condition (module docstring). Samples only
    with the "consistency" sampler, in 1 or more steps over a Karras grid from sigma_max."""

    name = "consistency"
    samplers = ("consistency",)

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 multistep_floor: float = 0.2):
        if sigma_data <= 0 or not 0 < sigma_min < multistep_floor < sigma_max:
            raise ConfigError(f"need sigma_data > 0 and 0 < sigma_min < multistep_floor < sigma_max, got {sigma_data}, "
                              f"{sigma_min}, {multistep_floor}, {sigma_max}")
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.multistep_floor = multistep_floor

    def sigma_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def sampling_sigmas(self, steps: int, sampler: str) -> Tensor:
        """Steps + 1 sigmas: sigma_max, then the levels the sample is re-noised to (a Karras grid down to
        `multistep_floor`: a jump from near sigma_min would change nothing), then 0. float64."""
        if steps == 1:
            return torch.tensor([self.sigma_max, 0.0], dtype=torch.float64)
        return sigmas_karras(steps, self.multistep_floor, self.sigma_max)

    def net_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        return _bc(c_in, x) * x, c_noise.to(x.dtype)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        c_skip, c_out = consistency_scalings(sigma, self.sigma_data, self.sigma_min)
        return _bc(c_skip, x) * x + _bc(c_out, x) * out

    def training_batch(self, x0: Tensor, generator: torch.Generator | None = None):
        raise ConfigError("a consistency model is distilled from a teacher (recipe distill), not trained with "
                          "a denoising loss")

    def __repr__(self) -> str:
        return f"ConsistencyObjective(sigma_data={self.sigma_data}, sigma_min={self.sigma_min})"

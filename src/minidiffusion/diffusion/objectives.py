"""Training objectives: how to noisify a batch, what the network sees and must predict, and how
its output becomes a denoiser `D(x, sigma, **cond) -> x0_hat` for the samplers.

A *network* here is any callable `net(x_in, noise_level, **cond) -> tensor shaped like x_in`
with `noise_level` a float tensor (B,) whose meaning belongs to the objective:

    objective               network input x_in          noise_level                 predicts
    DDPMObjective           x_t, abar of timestep t     timestep t in 0..T-1        eps
    CosineObjective('eps')  x_t, abar = cos(t pi/2)^2   time_scale * t, t in [0,1)  eps
    CosineObjective('v')    x_t, abar = cos(t pi/2)^2   time_scale * t, t in [0,1)  v
    EDMObjective            c_in * (x0 + sigma eps)     c_noise = ln(sigma) / 4     F (EDM's output)

with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (the VP variable) and v = sqrt(abar) eps - sqrt(1 - abar) x0.

Each objective is one small object with
  - `sigma_range() -> (sigma_min, sigma_max)` and `sampling_sigmas(steps, sampler)`: the noise levels it
    trained on and the step schedule it wants to be sampled with (owned here, not by the pipelines),
  - `training_batch(x0, generator) -> TrainingBatch` (network input, noise level, target, weight),
  - `loss(net, x0, *, generator=None, **cond) -> scalar` = mean over the batch of
    weight * mean((net(x_in, noise_level, **cond) - target)^2), what a Learner callback calls,
  - `denoiser(net) -> D(x, sigma, **cond)` with x in the variance-exploding scaling
    x = x0 + sigma * eps (so x_t = sqrt(abar) x) and sigma a (B,) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .schedules import (
    alpha_bar_cosine,
    alpha_bars_linear,
    cosine_t_from_sigma,
    sigma_from_alpha_bar,
    sigma_to_t,
    sigmas_ddpm,
    sigmas_karras,
)

__all__ = [
    "Network", "TrainingBatch", "Objective", "DDPMObjective", "CosineObjective", "EDMObjective", "OBJECTIVES",
    "get_objective", "noisify_ddpm", "noisify_cosine", "x0_from_eps", "x0_from_v", "eps_from_v",
    "v_from_x0_eps", "edm_scalings", "edm_loss_weight", "edm_sample_sigmas",
]

Network = Callable[..., Tensor]  # (x_in (B, ...), noise_level (B,), **cond) -> (B, ...)
_F64 = torch.float64


def _bc(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample (B,) value as (B, 1, ..., 1) in x's dtype and device, to multiply x with."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


# --- pure conversions between what a network may predict (VP terms, Salimans & Ho 2022) ---------
# With a = sqrt(abar), b = sqrt(1 - abar):  x_t = a x0 + b eps,  v = a eps - b x0,  a^2 + b^2 = 1.

def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (Ho et al. 2020, eq. 15). alpha_bar: (B,).
    Returns: tensor shaped like x_t."""
    return (x_t - _bc((1 - alpha_bar).sqrt(), x_t) * eps) / _bc(alpha_bar.sqrt(), x_t)


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The v target v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4). alpha_bar: (B,).
    Returns: tensor shaped like x0."""
    return _bc(alpha_bar.sqrt(), x0) * eps - _bc((1 - alpha_bar).sqrt(), x0) * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v. alpha_bar: (B,). Returns: tensor shaped like x_t."""
    return _bc(alpha_bar.sqrt(), x_t) * x_t - _bc((1 - alpha_bar).sqrt(), x_t) * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = sqrt(1 - abar) x_t + sqrt(abar) v. alpha_bar: (B,). Returns: tensor shaped like x_t."""
    return _bc((1 - alpha_bar).sqrt(), x_t) * x_t + _bc(alpha_bar.sqrt(), x_t) * v


# --- pure noisify functions ---------------------------------------------------------------------

def noisify_ddpm(x0: Tensor, alpha_bars: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM's forward process at a uniform random timestep per sample (Ho et al. 2020, Algorithm 1):
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
    Returns: (x_t shaped like x0, t int64 (B,) in [0, T-1], eps shaped like x0)."""
    t = torch.randint(0, len(alpha_bars), (x0.shape[0],), generator=generator, device=x0.device)
    eps = _randn_like(x0, generator)
    abar = alpha_bars.to(x0.device)[t]
    return _bc(abar.sqrt(), x0) * x0 + _bc((1 - abar).sqrt(), x0) * eps, t, eps


def noisify_cosine(x0: Tensor, generator: torch.Generator | None = None, offset: float = 0.0,
                   min_alpha_bar: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward process at continuous t ~ U[0, 1) per sample, abar = `alpha_bar_cosine(t)`.
    Returns: (x_t shaped like x0, t float64 (B,) in [0, 1), eps shaped like x0, abar float64 (B,))."""
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=_F64)
    eps = _randn_like(x0, generator)
    abar = alpha_bar_cosine(t, offset, min_alpha_bar)
    return _bc(abar.sqrt(), x0) * x0 + _bc((1 - abar).sqrt(), x0) * eps, t, eps, abar


# --- EDM (Karras et al. 2022) -------------------------------------------------------------------

def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1, "Ours" column):
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    Returns: four tensors shaped and typed like sigma; c_skip in (0, 1], c_out, c_in > 0."""
    sigma = torch.as_tensor(sigma)
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1), the weight of ||D - x0||^2.
    It equals 1 / c_out^2, so in the network's output space the loss is an unweighted MSE.
    Returns: tensor shaped like sigma, > 0."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_sample_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2, *,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (Table 1). Returns: float64 (n,), > 0."""
    return (torch.randn(n, generator=generator, device=device, dtype=_F64) * p_std + p_mean).exp()


# --- objectives ---------------------------------------------------------------------------------

@dataclass
class TrainingBatch:
    """One noisified batch, ready for `net(x_in, noise_level, **cond)`."""

    x_in: Tensor         # (B, ...) what the network is fed
    noise_level: Tensor  # (B,) float, in x_in's dtype: what the network is told about the noise
    target: Tensor       # (B, ...) what the network should output
    weight: Tensor       # (B,) float32 per-sample loss weight
    sigma: Tensor        # (B,) float64 VE noise level of each sample (for logging, loss-vs-sigma plots)


class Objective:
    """Base class: subclasses define `sigma_range`, `training_batch`, `net_inputs` and `to_x0`."""

    name = "objective"

    def sigma_range(self) -> tuple[float, float]:
        """Return (sigma_min, sigma_max): the noise levels this objective trains on, where sampling runs."""
        raise NotImplementedError

    def sampling_sigmas(self, steps: int, sampler: str) -> Tensor:
        """Return steps + 1 descending sigmas ending in 0 for `sampler`: Karras et al.'s rho = 7 schedule
        over `sigma_range()` (subclasses may prefer their own grid for some samplers).
        Returns: float64 [steps + 1]."""
        return sigmas_karras(steps, *self.sigma_range())

    def training_batch(self, x0: Tensor, generator: torch.Generator | None = None) -> TrainingBatch:
        """Noisify a clean batch x0 (B, ...). Returns: a `TrainingBatch`."""
        raise NotImplementedError

    def net_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """From VE x (B, ...) at sigma (B,): (network input shaped like x, noise level (B,) in x's dtype)."""
        raise NotImplementedError

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        """From VE x at sigma and the network output: x0_hat shaped like x."""
        raise NotImplementedError

    def loss(self, net: Network, x0: Tensor, *, generator: torch.Generator | None = None,
             **cond: Tensor) -> Tensor:
        """mean_b weight_b * mean((net(x_in, noise_level, **cond) - target)^2), computed in float32
        (whatever autocast made the network output). Returns: a scalar tensor >= 0."""
        b = self.training_batch(x0, generator)
        out = net(b.x_in, b.noise_level, **cond)
        per_sample = (out.float() - b.target.float()).pow(2).flatten(1).mean(1)  # (B,)
        return (b.weight.to(per_sample.device) * per_sample).mean()

    def denoiser(self, net: Network) -> Callable[..., Tensor]:
        """Wrap `net` as `D(x, sigma, **cond) -> x0_hat`: x (B, ...) VE-scaled, sigma (B,) > 0.
        Returns: a callable giving x0_hat shaped like x, in x's dtype."""

        def denoise(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
            sigma = torch.as_tensor(sigma, device=x.device)
            x_in, level = self.net_inputs(x, sigma)
            return self.to_x0(x, sigma, net(x_in, level, **cond))

        return denoise

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DDPMObjective(Objective):
    """DDPM (Ho et al. 2020): discrete timesteps, the network predicts the noise eps ("L_simple").

    The denoiser feeds the network x_t = sqrt(abar) x with abar = 1/(1 + sigma^2) at the exact
    sigma, and the timestep `sigma_to_t(sigma)` (fractional between the schedule's sigmas unless
    `quantize_t`), and returns x0_hat = x - sigma * eps_hat.
    """

    name = "ddpm"

    def __init__(self, alpha_bars: Tensor | None = None, quantize_t: bool = False):
        self.alpha_bars = (alpha_bars_linear() if alpha_bars is None
                           else torch.as_tensor(alpha_bars, dtype=_F64).cpu())
        self.quantize_t = quantize_t

    def sigma_range(self) -> tuple[float, float]:
        s = sigma_from_alpha_bar(self.alpha_bars)
        return float(s[0]), float(s[-1])

    def sampling_sigmas(self, steps: int, sampler: str) -> Tensor:
        """DDPM's own timesteps ("trailing" spacing) for the ddpm and ddim samplers, as the course sampled;
        Karras sigmas over the schedule's range for every other sampler. Returns: float64 [steps + 1]."""
        if sampler in ("ddpm", "ddim"):
            return sigmas_ddpm(steps, self.alpha_bars, spacing="trailing")
        return super().sampling_sigmas(steps, sampler)

    def training_batch(self, x0: Tensor, generator: torch.Generator | None = None) -> TrainingBatch:
        x_t, t, eps = noisify_ddpm(x0, self.alpha_bars, generator)
        sigma = sigma_from_alpha_bar(self.alpha_bars.to(x0.device)[t])
        return TrainingBatch(x_t, t.to(x0.dtype), eps, torch.ones(len(t), device=x0.device), sigma)

    def net_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        t = sigma_to_t(sigma, self.alpha_bars, quantize=self.quantize_t)
        return x * _bc((1 + sigma.to(_F64) ** 2).rsqrt(), x), t.to(x.dtype)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        return x - _bc(sigma, x) * out

    def __repr__(self) -> str:
        return f"DDPMObjective(T={len(self.alpha_bars)}, quantize_t={self.quantize_t})"


class CosineObjective(Objective):
    """Continuous-time cosine schedule (Nichol & Dhariwal 2021) with 'eps' or 'v' prediction
    (Salimans & Ho 2022). The network gets the VP input x_t = x / sqrt(1 + sigma^2) (c_in of EDM's
    VP column) and noise_level = time_scale * t, t = `cosine_t_from_sigma(sigma)` in [0, 1) (use
    time_scale=1000 for a network whose timestep embedding expects DDPM-like timesteps).

    Denoiser, written in VE form so it stays well-conditioned at large sigma:
      eps: x0_hat = x - sigma * eps_hat;
      v:   x0_hat = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat, i.e. EDM's preconditioning
           with sigma_data = 1 and F = -v.
    """

    name = "cosine"

    def __init__(self, prediction: str = "eps", offset: float = 0.0, min_alpha_bar: float = 0.0,
                 time_scale: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if prediction not in ("eps", "v"):
            raise ConfigError(f"Unknown prediction {prediction!r}; use 'eps' or 'v'.")
        self.prediction, self.offset, self.min_alpha_bar = prediction, offset, min_alpha_bar
        self.time_scale, self.sigma_min, self.sigma_max = time_scale, sigma_min, sigma_max

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, the sigma of min_alpha_bar) when abar is clamped, else (sigma_min, sigma_max)."""
        if self.min_alpha_bar > 0:
            m = self.min_alpha_bar
            return self.sigma_min, math.sqrt((1 - m) / m)
        return self.sigma_min, self.sigma_max

    def training_batch(self, x0: Tensor, generator: torch.Generator | None = None) -> TrainingBatch:
        x_t, t, eps, abar = noisify_cosine(x0, generator, self.offset, self.min_alpha_bar)
        target = eps if self.prediction == "eps" else v_from_x0_eps(x0, eps, abar)
        level = (t * self.time_scale).to(x0.dtype)
        ones = torch.ones(len(t), device=x0.device)
        return TrainingBatch(x_t, level, target, ones, sigma_from_alpha_bar(abar))

    def net_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        t = cosine_t_from_sigma(sigma, self.offset)
        return x * _bc((1 + sigma.to(_F64) ** 2).rsqrt(), x), (t * self.time_scale).to(x.dtype)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        if self.prediction == "eps":
            return x - _bc(sigma, x) * out
        s = sigma.to(_F64)
        return x * _bc(1 / (1 + s**2), x) - _bc(s * (1 + s**2).rsqrt(), x) * out

    def __repr__(self) -> str:
        return (f"CosineObjective(prediction={self.prediction!r}, offset={self.offset}, "
                f"min_alpha_bar={self.min_alpha_bar}, time_scale={self.time_scale})")


class EDMObjective(Objective):
    """Karras et al. 2022 (EDM): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (eq. 7, Table 1),
    training sigmas log-normal (P_mean, P_std), loss lambda(sigma) ||D - x0||^2. In F's space that
    is ||F - (x0 - c_skip x) / c_out||^2 with weight lambda c_out^2 = 1 (eq. 8).
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        if sigma_data <= 0 or p_std <= 0:
            raise ConfigError(f"sigma_data and p_std must be > 0, got {sigma_data} and {p_std}.")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max): EDM samples over 0.002..80 by default (Karras et al. 2022, sec. 5)."""
        return self.sigma_min, self.sigma_max

    def training_batch(self, x0: Tensor, generator: torch.Generator | None = None) -> TrainingBatch:
        sigma = edm_sample_sigmas(x0.shape[0], self.p_mean, self.p_std, generator=generator, device=x0.device)
        x = x0 + _bc(sigma, x0) * _randn_like(x0, generator)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        target = (x0 - _bc(c_skip, x0) * x) / _bc(c_out, x0)
        weight = edm_loss_weight(sigma, self.sigma_data) * c_out**2  # == 1 up to rounding (eq. 8)
        return TrainingBatch(_bc(c_in, x0) * x, c_noise.to(x0.dtype), target, weight.float(), sigma)

    def net_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        return _bc(c_in, x) * x, c_noise.to(x.dtype)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        return _bc(c_skip, x) * x + _bc(c_out, x) * out

    def __repr__(self) -> str:
        return f"EDMObjective(sigma_data={self.sigma_data}, p_mean={self.p_mean}, p_std={self.p_std})"


OBJECTIVES: dict[str, type[Objective]] = {
    "ddpm": DDPMObjective, "cosine": CosineObjective, "edm": EDMObjective,
}


def get_objective(name: str, **options) -> Objective:
    """Build the objective registered as `name` with keyword `options`. Returns: an `Objective`."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"Unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}.") from None
    return cls(**options)


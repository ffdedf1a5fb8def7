"""Noise schedules, all expressed as noise levels sigma of the variance-exploding view.

Every diffusion model in this package is looked at the way Karras et al. 2022 ("Elucidating
the Design Space of Diffusion-Based Generative Models", EDM) look at them: a noisy image is
`x = x0 + sigma * eps`. The variance-preserving (VP) DDPM variable `x_t = sqrt(abar) x0 +
sqrt(1 - abar) eps` is the same thing rescaled, `x_t = sqrt(abar) * x`, with

    sigma = sqrt((1 - abar) / abar)        abar = 1 / (1 + sigma^2)

so a DDPM linear or cosine alpha-bar schedule is just one more sequence of sigmas, and every
sampler (samplers.py) takes the same kind of input: `n + 1` sigmas, descending, ending in 0.

All functions are pure and return float64 tensors on the CPU (schedules are tiny; samplers
read them as Python floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from .samplers import get_sampler, steps_for_budget

__all__ = [
    "ddpm_betas", "alpha_bars_linear", "alpha_bar_cosine", "cosine_t_from_sigma",
    "sigma_from_alpha_bar", "alpha_bar_from_sigma", "ddpm_timesteps", "sigma_to_t", "t_to_sigma",
    "sigmas_karras", "sigmas_exponential", "sigmas_lambda_uniform", "sigmas_cosine", "sigmas_ddpm", "SPACINGS",
    "SCHEDULES", "schedule_for_budget", "sigmas_for_budget", "alpha_bars_scaled_linear",
]

SPACINGS = ("leading", "trailing", "linspace")
_F64 = torch.float64


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"The number of steps must be a positive integer, got {n!r}; pass e.g. n=50.")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"Need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# --- discrete DDPM (Ho et al. 2020) -------------------------------------------------------------

def ddpm_betas(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The linear beta schedule of DDPM (Ho et al. 2020, sec. 4: beta_1 = 1e-4 ... beta_T = 0.02).

    Returns: float64 [n], increasing from `beta_start` to `beta_end`, each in (0, 1).
    """
    _check_steps(n)
    if not 0 < beta_start <= beta_end < 1:
        raise ConfigError(f"Need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}.")
    return torch.linspace(beta_start, beta_end, n, dtype=_F64)


def alpha_bars_linear(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) for the linear betas (Ho et al. 2020, eq. 4).

    Index t = 0 .. n-1 is DDPM's t = 1 .. T (the diffusers convention).
    Returns: float64 [n], decreasing, in (0, 1); abar[0] = 1 - beta_start.
    """
    return torch.cumprod(1.0 - ddpm_betas(n, beta_start, beta_end), dim=0)


def ddpm_timesteps(n: int, n_train: int = 1000, spacing: str = "leading") -> Tensor:
    """`n` of the `n_train` discrete timesteps, for sampling with fewer steps than training used.

    The spacings are the three of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Table 2), as diffusers names them:
      - "leading":  0, k, 2k, ... (n-1)k with k = n_train // n (DDIM's original choice and the
                    diffusers default; it starts at (n-1)k <= n_train - k, never at the noisiest
                    timestep n_train - 1);
      - "trailing": round(n_train - i * n_train / n) - 1, so it always starts at n_train - 1;
      - "linspace": round(linspace(0, n_train - 1, n)).
    Returns: int64 [n], strictly decreasing, in [0, n_train - 1].
    """
    _check_steps(n)
    if n > n_train:
        raise ConfigError(f"Cannot take {n} steps of a {n_train}-timestep schedule; use n <= {n_train}.")
    if spacing == "leading":
        ts = torch.arange(n, dtype=_F64) * (n_train // n)
    elif spacing == "trailing":
        ts = torch.round(n_train - torch.arange(n, dtype=_F64) * (n_train / n)) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, n_train - 1, n, dtype=_F64))
    else:
        raise ConfigError(f"Unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}.")
    return ts.sort(descending=True).values.to(torch.int64)


# --- continuous cosine (Nichol & Dhariwal 2021) -------------------------------------------------

def _cosine_f0(offset: float) -> float:
    return math.cos(offset / (1 + offset) * math.pi / 2) ** 2


def alpha_bar_cosine(t: Tensor | float, offset: float = 0.0, min_alpha_bar: float = 0.0) -> Tensor:
    """The cosine schedule abar(t) = f(t) / f(0), f(t) = cos((t + s)/(1 + s) * pi/2)^2
    (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), for continuous t in [0, 1).

    With the course's default `offset` s = 0 this is plain cos(t pi/2)^2, i.e. sigma = tan(t pi/2).
    Improved DDPM uses s = 0.008 so that beta is not vanishingly small near t = 0 (more noise
    early: abar(t, s) < abar(t, 0) for t > 0). abar -> 0 (sigma ->
    infinity) as t -> 1; `min_alpha_bar` > 0 clamps it (like their beta <= 0.999 clip) so that
    t = 1 is usable.
    Returns: float64 tensor shaped like `t`, in [min_alpha_bar, 1], decreasing in t.
    """
    t = torch.as_tensor(t, dtype=_F64)
    abar = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2 / _cosine_f0(offset)
    return abar.clamp(min=min_alpha_bar, max=1.0)


def cosine_t_from_sigma(sigma: Tensor | float, offset: float = 0.0) -> Tensor:
    """Inverse of the (unclamped) cosine schedule: the t in [0, 1) whose abar(t) = 1/(1 + sigma^2).

    cos(theta) = sqrt(abar * f0) is solved with atan2 (well conditioned for small sigma); with
    offset 0 this is t = 2/pi * atan(sigma).
    Returns: float64 tensor shaped like `sigma`, in [0, 1).
    """
    sigma = torch.as_tensor(sigma, dtype=_F64)
    f0 = _cosine_f0(offset)
    # cos^2(theta) = f0 / (1 + sigma^2)  and  sin^2(theta) = (1 + sigma^2 - f0) / (1 + sigma^2)
    theta = torch.atan2(torch.sqrt(1 + sigma**2 - f0), torch.full_like(sigma, math.sqrt(f0)))
    return (theta * 2 / math.pi * (1 + offset) - offset).clamp(0.0, 1.0)


# --- the sigma <-> alpha-bar change of variables ------------------------------------------------

def sigma_from_alpha_bar(alpha_bar: Tensor | float) -> Tensor:
    """sigma = sqrt((1 - abar) / abar): the VE noise level of a VP noise level (EDM, Table 1, VP column).

    Returns: float64 tensor shaped like `alpha_bar`, in [0, inf).
    """
    abar = torch.as_tensor(alpha_bar, dtype=_F64)
    return torch.sqrt((1 - abar) / abar)


def alpha_bar_from_sigma(sigma: Tensor | float) -> Tensor:
    """abar = 1 / (1 + sigma^2), the inverse of `sigma_from_alpha_bar`.

    Returns: float64 tensor shaped like `sigma`, in (0, 1].
    """
    sigma = torch.as_tensor(sigma, dtype=_F64)
    return 1 / (1 + sigma**2)


def sigma_to_t(sigma: Tensor, alpha_bars: Tensor, quantize: bool = False) -> Tensor:
    """The (fractional) discrete timestep of a noise level, by linear interpolation in log-sigma
    between the timesteps of `alpha_bars` (as k-diffusion's DiscreteSchedule does), so that a
    network trained on integer timesteps can be run at any sigma. A sigma that is exactly one of
    the schedule's gives that integer exactly; sigmas beyond the ends are clamped.
    `quantize=True` rounds to the nearest timestep instead.
    Returns: float64 tensor shaped like `sigma`, in [0, len(alpha_bars) - 1], on sigma's device.
    """
    sigma = torch.as_tensor(sigma)
    log_sigmas = torch.log(sigma_from_alpha_bar(alpha_bars)).to(sigma.device)  # increasing in t
    log_sigma = torch.log(sigma.to(_F64))
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
    t = low.to(_F64) + w
    return t.round() if quantize else t


def t_to_sigma(t: Tensor, alpha_bars: Tensor) -> Tensor:
    """The inverse of `sigma_to_t`: sigma at a fractional timestep, interpolating log-sigma.

    Returns: float64 tensor shaped like `t`, positive.
    """
    t = torch.as_tensor(t, dtype=_F64)
    log_sigmas = torch.log(sigma_from_alpha_bar(alpha_bars)).to(t.device)
    low = t.floor().long().clamp(0, len(log_sigmas) - 2)
    w = t - low
    return torch.exp((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1])


# --- sampling schedules: n + 1 descending sigmas ending in 0 ------------------------------------

def sigmas_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The EDM step schedule (Karras et al. 2022, eq. 5):
    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.

    Larger rho puts more of the steps at low noise (rho = 1 is uniform in sigma, rho -> inf is
    uniform in log sigma); EDM found rho = 7 best.
    Returns: float64 [n + 1], descending from sigma_max to sigma_min, then 0.
    """
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=_F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Sigmas evenly spaced in log sigma: the log-SNR-uniform ("time-uniform in lambda") step
    schedule of DPM-Solver (Lu et al. 2022, their "logSNR" spacing), because their
    lambda = log(alpha / sigma_VP) = -log sigma here (half the log-SNR), so every step has the same
    h = lambda_{i+1} - lambda_i = log(sigma_i / sigma_{i+1}). Also the rho -> infinity limit of
    `sigmas_karras`, and diffusers' use_exponential_sigmas / use_lu_lambdas.
    `sigmas_lambda_uniform` is the same function.

    Returns: float64 [n + 1], descending from sigma_max to sigma_min, then 0.
    """
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=_F64).exp())


sigmas_lambda_uniform = sigmas_exponential


def sigmas_cosine(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, offset: float = 0.0) -> Tensor:
    """Sigmas of `n` continuous times evenly spaced in t of the cosine schedule (`alpha_bar_cosine`),
    from the t of sigma_max down to the t of sigma_min: the steps a cosine-trained model takes
    with a DDIM-style sampler (with offset 0, sigma_i = tan(t_i pi/2)).

    Returns: float64 [n + 1], descending from sigma_max to sigma_min, then 0.
    """
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    t_hi, t_lo = cosine_t_from_sigma(sigma_max, offset), cosine_t_from_sigma(sigma_min, offset)
    t = torch.linspace(float(t_hi), float(t_lo), n, dtype=_F64)
    sigmas = sigma_from_alpha_bar(alpha_bar_cosine(t, offset))
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends, whatever the rounding of the round trip
    return _append_zero(sigmas)


def sigmas_ddpm(n: int, alpha_bars: Tensor | None = None, spacing: str = "leading", offset: int = 0,
                alpha_to_one: bool = True) -> Tensor:
    """The sigmas of `n` timesteps (`ddpm_timesteps`, with `spacing`, shifted by `offset`) of a discrete DDPM schedule.

    The final 0 stands for DDPM's "t = 0" (abar = 1, diffusers' `set_alpha_to_one`), so sampling
    with these sigmas reproduces DDPM/DDIM with the same timesteps step for step. Stable
    Diffusion's scheduler uses `offset=1` (its `steps_offset`) and `alpha_to_one=False`: the last
    step then ends at the sigma of the first timestep instead of 0.
    `alpha_bars` defaults to `alpha_bars_linear()` (T = 1000).
    Returns: float64 [n + 1], descending, ending in 0 (or in sigma(t = 0) without `alpha_to_one`).
    """
    alpha_bars = alpha_bars_linear() if alpha_bars is None else torch.as_tensor(alpha_bars, dtype=_F64)
    ts = (ddpm_timesteps(n, len(alpha_bars), spacing) + offset).clamp(max=len(alpha_bars) - 1)
    sigmas = sigma_from_alpha_bar(alpha_bars.cpu()[ts])
    if alpha_to_one:
        return _append_zero(sigmas)
    return torch.cat([sigmas, sigma_from_alpha_bar(alpha_bars.cpu()[:1])])


def alpha_bars_scaled_linear(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """abar_t for Stable Diffusion's "scaled_linear" betas: beta = linspace(sqrt(beta_start), sqrt(beta_end), n)^2.

    Returns: float64 [n], decreasing, in (0, 1).
    """
    _check_steps(n)
    if not 0 < beta_start <= beta_end < 1:
        raise ConfigError(f"Need 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}.")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=_F64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# --- a schedule per NFE budget ------------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": sigmas_karras,
    "exponential": sigmas_exponential,
    "cosine": sigmas_cosine,
}  # each (n, sigma_min, sigma_max) -> n + 1 sigmas ending in 0

# The exponential integrators: derived in lambda = -log sigma, they take the grid uniform in it.
# The smallest NFE budget at which the exponential (log-SNR-uniform) grid beats Karras' for a sampler;
# below it, and for every sampler not listed, Karras. Measured on the shipped model (FID at N = 500,
# BENCHMARKS.md "Sampler by NFE"): DPM-Solver++(2M) and UniPC 0.35 / 0.17 / 0.16 at 3 / 5 / 8 NFE on
# Karras' grid against 1.09 / 0.20 / 0.14 on the exponential one; iPNDM 0.48 / 0.29 / 0.20 against
# 1.08 / 0.22 / 0.17; DPM-Solver++(3M) SDE 0.49 / 1.54 / 1.54 against 0.82 / 0.95 / 0.56. The other
# lambda solvers (2M SDE, 2S ancestral) were not measured on both grids and follow 2M.
_EXPONENTIAL_FROM = {"dpmpp_2m": 8, "dpmpp_2m_sde": 8, "dpmpp_2s_ancestral": 8, "unipc": 8,
                     "dpmpp_3m_sde": 5, "ipndm": 5}


def schedule_for_budget(sampler: str, nfe: int) -> str:
    """The schedule family (a key of SCHEDULES) for `sampler` at a budget of `nfe` evaluations.

    The rule is the benchmark's (benchmarks/samplers.py --schedules, BENCHMARKS.md): "exponential"
    (uniform in lambda = -log sigma, DPM-Solver's spacing) from the budget where it beats Karras' grid
    for that sampler (`_EXPONENTIAL_FROM`: 8 NFE for DPM-Solver++(2M) and UniPC, 5 for iPNDM and
    DPM-Solver++(3M) SDE), "karras" (rho = 7, the package default) below it and for every other
    sampler: its long first steps from sigma_max are what a 3-5 step solver needs, and Heun loses
    much of its accuracy on the log-uniform grid. Returns: "karras" or "exponential".
    """
    steps_for_budget(sampler, nfe)  # checks the name and the budget
    start = _EXPONENTIAL_FROM.get(sampler)
    return "exponential" if start is not None and nfe >= start else "karras"


def sigmas_for_budget(sampler: str, nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """The sigmas to sample with `sampler` on a budget of `nfe` denoiser evaluations: as many steps
    as the honest count allows (`samplers.steps_for_budget`, so Heun gets about half the steps),
    on the family `schedule_for_budget` picks, from sigma_max down to sigma_min, then 0.

    Returns: float64 [steps + 1], descending, ending in 0; nfe(sampler, steps) <= nfe (one step
    even when it costs more).
    """
    get_sampler(sampler)
    return SCHEDULES[schedule_for_budget(sampler, nfe)](steps_for_budget(sampler, nfe), sigma_min, sigma_max)

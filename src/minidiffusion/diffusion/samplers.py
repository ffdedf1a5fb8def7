"""Samplers: pure functions that integrate a denoiser from noise down a sequence of sigmas.

Every sampler has the same signature (the Karras et al. 2022 view, see docs/design.md):

    sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x

- `denoiser(x, sigma, **cond) -> x0_hat`: x (B, ...) in the variance-exploding scaling
  x = x0 + sigma * eps, sigma a float tensor (B,); returns the estimate of x0, shaped like x.
  Build one from a trained network with `Objective.denoiser(net)` (objectives.py); wrap it with
  guidance (guidance.py) -- samplers never know.
- `x`: the starting point at noise level sigmas[0], usually `torch.randn(shape) * sigmas[0]`.
  DDPM and DDIM run on the same variable: their VP x_t is `sqrt(abar_t) * x`.
- `sigmas`: 1-D, strictly decreasing, >= 0, usually ending in 0 (schedules.py builds them).
  Every step from sigmas[i] to sigmas[i+1]; n = len(sigmas) - 1 steps.
- `generator`: every random draw uses it, so the same seed gives bit-identical samples on CPU.
- `callback(info)`: called after each step with a dict: `i` (step index, 0 .. n-1), `x` (the
  state after the step, at sigma_next), `sigma`, `sigma_next` (Python floats), `denoised` (the
  step's first x0 estimate, shaped like x).

The returned x has x's dtype and device. Inside, the state and all coefficients are float64
(float32 on MPS, which has no float64): a thousand small updates in float32 lose digits. The
denoiser is called with x in the input dtype and sigma as a float64 (B,) tensor.

Some names are the same update in two literatures, and share one code path here: DDIM with
eta = 0 *is* Euler on the probability-flow ODE (Karras et al. 2022, sec. 4 / eq. 4), DDIM with
eta is Euler-ancestral with eta, and the DDPM posterior step ("fixed small" variance) is DDIM
with eta = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "Denoiser", "SamplerCallback", "to_d", "ancestral_split", "churn",
    "sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_lms", "sample_dpmpp_2m", "SAMPLERS", "get_sampler", "nfe",
]

Denoiser = Callable[..., Tensor]  # (x (B, ...), sigma (B,), **cond) -> x0_hat (B, ...)
SamplerCallback = Callable[[dict[str, Any]], None]
_Split = Callable[[float, float], tuple[float, float]]


# --- tiny shared helpers ------------------------------------------------------------------------

def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4
    with s(t) = 1, sigma(t) = t). Returns: tensor shaped like x."""
    return (x - denoised) / sigma


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split the step sigma -> sigma_next into a deterministic move down to `sigma_down` and fresh
    noise `sigma_up`, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is DDIM's sigma_t (Song et al.
    2021, eq. 16) divided by sqrt(abar_{t-1}); eta = 1 is the DDPM posterior, eta = 0 deterministic.
    sigma_up is capped at sigma_next (so eta > 1 stays defined). Returns (sigma_down, sigma_up), >= 0.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - (sigma_next / sigma) ** 2)))
    return math.sqrt(sigma_next**2 - up**2), up


def churn(x: Tensor, sigma: float, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float, generator: torch.Generator | None) -> tuple[Tensor, float]:
    """EDM's stochastic "churn" (Karras et al. 2022, Algorithm 2, lines 4-6): raise the noise level
    to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / n_steps, sqrt(2) - 1) while
    s_tmin <= sigma <= s_tmax (else 0), by adding noise of std sqrt(sigma_hat^2 - sigma^2) * s_noise.
    Draws from `generator` only when gamma > 0. Returns (x_hat shaped like x, sigma_hat)."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + _randn_like(x, generator) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2)), sigma_hat


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _check_sigmas(sigmas: Tensor | Sequence[float]) -> list[float]:
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.ndim != 1 or len(s) < 2:
        raise ConfigError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(s.shape)}.")
    if not torch.isfinite(s).all() or (s < 0).any() or not (s[1:] < s[:-1]).all():
        raise ConfigError("sigmas must be finite, >= 0 and strictly decreasing; build them with schedules.py")
    return s.tolist()


class _Run:
    """What every sampler does around its update: float64 state, denoiser calls, callbacks."""

    def __init__(self, denoiser: Denoiser, x: Tensor, callback: SamplerCallback | None):
        self.denoiser, self.callback, self.dtype = denoiser, callback, x.dtype
        self.x = x.to(_work_dtype(x))

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        sigma_b = x.new_full((x.shape[0],), sigma)
        return self.denoiser(x.to(self.dtype), sigma_b).to(x.dtype)

    def report(self, i: int, sigma: float, sigma_next: float, denoised: Tensor) -> None:
        if self.callback is not None:
            self.callback({"i": i, "x": self.x.to(self.dtype), "sigma": sigma, "sigma_next": sigma_next,
                           "denoised": denoised.to(self.dtype)})

    def result(self) -> Tensor:
        return self.x.to(self.dtype)


# --- ancestral family: DDPM, DDIM, Euler-ancestral ----------------------------------------------

def _sample_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, split: _Split,
                      generator: torch.Generator | None, callback: SamplerCallback | None) -> Tensor:
    """x <- x + d (sigma_down - sigma) + sigma_up z, (sigma_down, sigma_up) = split(sigma, sigma_next)."""
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        down, up = split(s, s_next)
        run.x = run.x + to_d(run.x, s, denoised) * (down - s)
        if up > 0:
            run.x = run.x + _randn_like(run.x, generator) * up
        run.report(i, s, s_next, denoised)
    return run.result()


def _ddpm_large_split(sigma: float, sigma_next: float) -> tuple[float, float]:
    # Posterior mean (sigma_down = sigma_next^2 / sigma) plus noise of variance beta_t instead of the
    # posterior's beta_tilde: beta_t / abar_{t-1} = (sigma^2 - sigma_next^2)(1 + sigma_next^2)/(1 + sigma^2).
    if sigma_next == 0:
        return 0.0, 0.0
    up = math.sqrt((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))
    return sigma_next**2 / sigma, up


def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                callback: SamplerCallback | None = None, variance: str = "small") -> Tensor:
    """Ancestral sampling with the DDPM posterior q(x_{t-1} | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7).

    In sigma space the posterior mean is x0_hat + (sigma_next / sigma)^2 (x - x0_hat). `variance`:
    "small" = the posterior variance beta_tilde (diffusers' "fixed_small"; identical to DDIM with
    eta = 1), "large" = beta_t (the course's sigma_t = sqrt(beta_t); diffusers' "fixed_large").
    No noise is added on a step to sigma 0.
    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    if variance not in ("small", "large"):
        raise ConfigError(f"Unknown DDPM variance {variance!r}; use 'small' or 'large'.")
    split = (lambda s, s_next: ancestral_split(s, s_next, 1.0)) if variance == "small" else _ddpm_large_split
    return _sample_ancestral(denoiser, x, sigmas, split, generator, callback)


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                           generator: torch.Generator | None = None, callback: SamplerCallback | None = None,
                           eta: float = 1.0) -> Tensor:
    """Euler-ancestral: an Euler step down to sigma_down, then fresh noise sigma_up (`ancestral_split`;
    Karras et al. 2022 sec. 4 reading of Song et al. 2021's DDIM; eta = 1 samples like DDPM).

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}.")
    return _sample_ancestral(denoiser, x, sigmas, lambda s, s_next: ancestral_split(s, s_next, eta),
                             generator, callback)


def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                callback: SamplerCallback | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space: x_next = x0_hat + sigma_down * eps_hat +
    sigma_up * z, eps_hat = (x - x0_hat) / sigma. The same update as `sample_euler_ancestral`
    (only the default eta differs): eta = 0 is deterministic and equals `sample_euler`.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    return sample_euler_ancestral(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta)


# --- ODE solvers (optionally with EDM churn) ----------------------------------------------------

def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                 callback: SamplerCallback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al.
    2022, Algorithm 2 without the correction), with optional churn (`churn`; s_churn = 0: none).

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    for i, (s, s_next) in enumerate(pairwise(sig)):
        x_hat, s_hat = churn(run.x, s, len(sig) - 1, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = run.denoise(x_hat, s_hat)
        run.x = x_hat + to_d(x_hat, s_hat, denoised) * (s_next - s_hat)
        run.report(i, s, s_next, denoised)
    return run.result()


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                callback: SamplerCallback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """Heun's 2nd-order method with EDM churn (Karras et al. 2022, Algorithm 2): an Euler step,
    then the trapezoidal correction with the slope at the end point, except on a step to sigma 0
    (where the slope is undefined): 2 denoiser calls per step, 1 on the last.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    for i, (s, s_next) in enumerate(pairwise(sig)):
        x_hat, s_hat = churn(run.x, s, len(sig) - 1, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = run.denoise(x_hat, s_hat)
        d = to_d(x_hat, s_hat, denoised)
        x_next = x_hat + d * (s_next - s_hat)
        if s_next > 0:  # Algorithm 2, lines 9-11
            d_next = to_d(x_next, s_next, run.denoise(x_next, s_next))
            x_next = x_hat + (d + d_next) * ((s_next - s_hat) / 2)
        run.x = x_next
        run.report(i, s, s_next, denoised)
    return run.result()


def _lms_coefficients(sig: list[float], i: int, order: int) -> list[float]:
    """Integrals over [sig[i], sig[i+1]] of the Lagrange basis polynomials on the nodes
    sig[i], sig[i-1], ..., sig[i-order+1] (exact: polynomial antiderivatives, float64)."""
    nodes = [sig[i - j] for j in range(order)]
    coeffs = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])  # L_j(tau) = prod_{k != j} (tau - s_k) / (s_j - s_k)
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        coeffs.append(float(antiderivative(sig[i + 1]) - antiderivative(sig[i])))
    return coeffs


def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
               callback: SamplerCallback | None = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth on the non-uniform sigma grid, as in Karras et al. 2022's
    k-diffusion LMS): the step integrates the polynomial through the last `order` slopes; the first
    steps use as many slopes as exist. One denoiser call per step. `generator` is unused.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    if order < 1:
        raise ConfigError(f"LMS order must be >= 1, got {order}.")
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    ds: list[Tensor] = []  # slopes, newest last
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        ds = (ds + [to_d(run.x, s, denoised)])[-order:]
        coeffs = _lms_coefficients(sig, i, len(ds))
        run.x = run.x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
        run.report(i, s, s_next, denoised)
    return run.result()


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                    generator: torch.Generator | None = None,
                    callback: SamplerCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction, in lambda =
    -log sigma): x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) D, where D extrapolates the
    last two x0 estimates; first-order (= Euler/DDIM) on the first step and on a step to sigma 0.
    One denoiser call per step. `generator` is unused.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    old_denoised: Tensor | None = None
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        d_hat = denoised
        if old_denoised is not None and s_next > 0:
            r = math.log(sig[i - 1] / s) / math.log(s / s_next)  # h_{i-1} / h_i
            d_hat = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
        # exp(-h) = sigma_next / sigma; -expm1(-h) = 1 - sigma_next / sigma
        ratio = s_next / s
        run.x = run.x * ratio + d_hat * (1 - ratio)
        old_denoised = denoised
        run.report(i, s, s_next, denoised)
    return run.result()


# --- registry -----------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered as `name`. Returns: one of the `sample_*` functions."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.") from None


def nfe(name: str, steps: int, ends_at_zero: bool = True) -> int:
    """The honest number of denoiser evaluations for `steps` steps (len(sigmas) = steps + 1):
    one per step, except Heun's two per step, minus one when the last step goes to sigma 0.
    (A guided denoiser makes each evaluation one network call of twice the batch.)
    Returns: int >= 0.
    """
    get_sampler(name)
    if name == "heun":
        return 2 * steps - (1 if ends_at_zero and steps > 0 else 0)
    return steps

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
with eta = 1. The first-order DPM-Solver++ step in lambda = -log sigma is that same Euler/DDIM
step too (in this scaling x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) D), so the
exponential integrators (DPM-Solver++, UniPC) differ from it only by their correction terms, and
DPM-Solver++(2M) is DPM-Solver++(2M) SDE with eta = 0. iPNDM is LMS with the constant-step
Adams-Bashforth weights.

Stochastic samplers (ddpm, euler_ancestral, ddim with eta > 0, churn, the SDE and ancestral
DPM-Solver++ variants with eta > 0) draw all their noise from `generator`, one standard normal
tensor shaped like x per noisy step; deterministic ones (and eta = 0) never touch it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "Denoiser", "SamplerCallback", "to_d", "ancestral_split", "churn",
    "sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_lms", "sample_ipndm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
    "sample_dpmpp_2s_ancestral", "sample_unipc", "sample_consistency",
    "SAMPLERS", "get_sampler", "nfe", "steps_for_budget",
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


@cache
def _adams_bashforth(order: int) -> tuple[float, ...]:
    """The constant-step Adams-Bashforth weights, newest slope first ((3, -1)/2, (23, -16, 5)/12,
    (55, -59, 37, -9)/24): the LMS coefficients on the unit grid 0, 1, ..., order."""
    return tuple(_lms_coefficients([float(k) for k in range(order + 1)], order - 1, order))


def _sample_multistep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, order: int,
                      coefficients: Callable[[list[float], int, int], Sequence[float]],
                      callback: SamplerCallback | None) -> Tensor:
    """x <- x + sum_j c_j d_{i-j} over the last `order` slopes d = to_d(...), newest first, with
    c = coefficients(sig, i, how many slopes exist yet) (the warm start uses fewer)."""
    if order < 1:
        raise ConfigError(f"The multistep order must be >= 1, got {order}.")
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    ds: list[Tensor] = []  # slopes, newest last
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        ds = (ds + [to_d(run.x, s, denoised)])[-order:]
        coeffs = coefficients(sig, i, len(ds))
        run.x = run.x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
        run.report(i, s, s_next, denoised)
    return run.result()


def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
               callback: SamplerCallback | None = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth on the non-uniform sigma grid, as in Karras et al. 2022's
    k-diffusion LMS): the step integrates the polynomial through the last `order` slopes; the first
    steps use as many slopes as exist. One denoiser call per step. `generator` is unused.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    return _sample_multistep(denoiser, x, sigmas, order, _lms_coefficients, callback)


def sample_ipndm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                 callback: SamplerCallback | None = None, order: int = 4) -> Tensor:
    """iPNDM, the "improved PNDM" of Zhang & Chen 2022 (DEIS paper): PNDM's (Liu et al. 2022)
    fourth-order Adams-Bashforth update of eps, with PNDM's Runge-Kutta warm start replaced by
    lower-order Adams-Bashforth steps. In this scaling PNDM's DDIM-style transfer is an Euler step,
    so the step is x + (sigma_next - sigma) * sum_j b_j d_{i-j} with the constant-step weights b
    (`_adams_bashforth`) used on the given sigma grid as it is, as k-diffusion's (ComfyUI's) ipndm
    and diffusers' IPNDMScheduler do (`lms` is the variable-step version). `order` in 1 .. 4;
    one denoiser call per step, the last step included. `generator` is unused.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    if order not in (1, 2, 3, 4):
        raise ConfigError(f"iPNDM order must be 1, 2, 3 or 4, got {order}.")
    return _sample_multistep(denoiser, x, sigmas, order,
                             lambda sig, i, k: [(sig[i + 1] - sig[i]) * b for b in _adams_bashforth(k)], callback)


# --- exponential integrators in lambda = -log sigma: DPM-Solver++, UniPC -------------------------
# In this scaling the data-prediction ODE is dx/dlambda = D - x, solved exactly by
#   x(lambda_t) = e^{-h} x(lambda_s) + int_0^h e^{-(h - u)} x0(lambda_s + u) du,  h = lambda_t - lambda_s
# (the exact solution with a data-prediction model of Lu et al. 2022, DPM-Solver++, with alpha = 1);
# the solvers differ in how they interpolate x0 between the denoiser's outputs.

def _exp_step(x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> Tensor:
    """The first-order DPM-Solver++ step (= DDIM = Euler here): x0 held constant over the step.
    Returns: (sigma_next/sigma) x + (1 - sigma_next/sigma) denoised, shaped like x."""
    ratio = sigma_next / sigma
    return x * ratio + denoised * (1 - ratio)


def _phi_weights(big_h: float) -> tuple[float, float]:
    """w2 = int_0^H e^{-(H-v)} v dv / H and w3 = int_0^H e^{-(H-v)} v^2/2 dv / H^2: the weights of
    h x0' and h^2 x0'' in a step whose integrating factor is e^{-H} (H = (1 + eta) h).
    Returns: (w2, w3), both in (0, 1/2)."""
    w2 = (big_h + math.expm1(-big_h)) / big_h  # = 1 - (1 - e^{-H}) / H
    return w2, 0.5 - w2 / big_h


def _dpmpp_correction(ds: list[Tensor], sig: list[float], i: int, big_h: float, solver_type: str) -> Tensor | float:
    """The higher-order terms of a DPM-Solver++ multistep step from sig[i] to sig[i+1], with
    ds = the x0 estimates at sig[i], sig[i-1], ... (newest first, 1 to 3 of them): backward
    differences in lambda, scaled to the current step h, give d1 ~ h x0' and d2 ~ h^2 x0''.
    Two estimates: 0.5 (1 - e^{-H}) d1 ("midpoint", Lu et al. 2022 Algorithm 2) or w2 d1 ("heun",
    the Taylor term exactly); three: w2 d1 + w3 d2 (3M). Returns: a tensor shaped like x, or 0."""
    if len(ds) == 1:
        return 0.0
    h = math.log(sig[i] / sig[i + 1])
    r0 = math.log(sig[i - 1] / sig[i]) / h  # h_{i-1} / h_i: the ratio of consecutive log-sigma steps
    d1 = (ds[0] - ds[1]) / r0
    w2, w3 = _phi_weights(big_h)
    if len(ds) == 2:
        return d1 * (-0.5 * math.expm1(-big_h) if solver_type == "midpoint" else w2)
    r1 = math.log(sig[i - 2] / sig[i - 1]) / h
    d2 = (d1 - (ds[1] - ds[2]) / r1) * (2 / (r0 + r1))  # second divided difference, times h^2
    return (d1 + d2 * (r0 / 2)) * w2 + d2 * w3  # d1 moved from the last interval's midpoint to sig[i]


def _sample_dpmpp_multistep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, order: int, eta: float,
                            solver_type: str, generator: torch.Generator | None,
                            callback: SamplerCallback | None) -> Tensor:
    """DPM-Solver++(kM) for the reverse SDE with noise fraction eta (eta = 0: the ODE):
    x_next = e^{-(1+eta) h} x + (1 - e^{-(1+eta) h}) D + corrections + sigma_next sqrt(1 - e^{-2 eta h}) z,
    with the order rising from 1 as estimates accumulate; a step to sigma 0 returns D."""
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}.")
    if solver_type not in ("midpoint", "heun"):
        raise ConfigError(f"Unknown DPM-Solver++ solver_type {solver_type!r}; use 'midpoint' or 'heun'.")
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    ds: list[Tensor] = []  # x0 estimates, newest first
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        ds = [denoised, *ds][:order]
        if s_next == 0:
            run.x = denoised
        else:
            h = math.log(s / s_next)
            big_h = (1 + eta) * h
            run.x = (run.x * math.exp(-big_h) - denoised * math.expm1(-big_h)
                     + _dpmpp_correction(ds, sig, i, big_h, solver_type))
            if eta > 0:  # the exact variance of the SDE's transition over the step
                run.x = run.x + _randn_like(run.x, generator) * (s_next * math.sqrt(-math.expm1(-2 * eta * h)))
        run.report(i, s, s_next, denoised)
    return run.result()


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                    generator: torch.Generator | None = None,
                    callback: SamplerCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction, in lambda =
    -log sigma): x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) D, where D extrapolates the
    last two x0 estimates; first-order (= Euler/DDIM) on the first step and on a step to sigma 0.
    The same code as `sample_dpmpp_2m_sde` with eta = 0. One denoiser call per step. `generator`
    is unused.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    return _sample_dpmpp_multistep(denoiser, x, sigmas, 2, 0.0, "midpoint", None, callback)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                        generator: torch.Generator | None = None, callback: SamplerCallback | None = None,
                        eta: float = 1.0, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE: DPM-Solver++ (Lu et al. 2022) applied to the reverse diffusion SDE, as
    Lu contributed it to diffusers ("sde-dpmsolver++"), with k-diffusion's eta:
    x_next = e^{-(1+eta)h} x + (1 - e^{-(1+eta)h}) D + c + sigma_next sqrt(-expm1(-2 eta h)) z.
    This is the corrected form: the second-order correction c uses r = h_{i-1} / h_i, the ratio of
    the previous log-sigma step to this one, and its weight (1 - e^{-(1+eta)h}) / 2 ("midpoint") or
    1 - (1 - e^{-H}) / H, H = (1 + eta) h ("heun") contains the eta, as does the noise std
    sigma_next sqrt(1 - e^{-2 eta h}), which is the exact variance of the SDE's transition.
    eta = 1 is the reverse SDE (its first step is the DDPM posterior step), eta = 0 is
    `sample_dpmpp_2m` and draws nothing. First order on the first step; a step to sigma 0 returns
    the x0 estimate. One denoiser call per step.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    return _sample_dpmpp_multistep(denoiser, x, sigmas, 2, eta, solver_type, generator, callback)


def sample_dpmpp_3m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                        generator: torch.Generator | None = None, callback: SamplerCallback | None = None,
                        eta: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE: as `sample_dpmpp_2m_sde`, with x0 interpolated quadratically in lambda
    through the last three estimates (the third-order Taylor term of the exponential integrator):
    x_next = ... + w2 d1 + w3 d2, d1 ~ h x0', d2 ~ h^2 x0'' (`_dpmpp_correction`). Orders 1, 2
    ("heun" form), then 3. k-diffusion's sample_dpmpp_3m_sde and diffusers' third-order multistep
    weight their D2 (which estimates h^2 x0'' / 2) by w3 where the integral gives 2 w3, which leaves
    them second order; here the weight is exact, so the method is third order (and exact when x0 is
    quadratic in lambda). eta as in `sample_dpmpp_2m_sde`; eta = 0 draws nothing. One denoiser call
    per step.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    return _sample_dpmpp_multistep(denoiser, x, sigmas, 3, eta, "heun", generator, callback)


def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                              generator: torch.Generator | None = None, callback: SamplerCallback | None = None,
                              eta: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, Algorithm 1 with r = 1/2, as
    k-diffusion's dpmpp_2s_ancestral): each step splits sigma -> sigma_next like Euler-ancestral
    (`ancestral_split`), takes the deterministic part with a 2S step (a first-order step to the
    lambda-midpoint sqrt(sigma sigma_down), a second evaluation there, then the first-order step
    from sigma with that x0 estimate), then adds noise sigma_up z. A step whose sigma_down is 0
    (the last step to sigma 0) is a plain Euler step. eta = 0 is the deterministic DPM-Solver++(2S)
    and draws nothing. Two denoiser calls per step, one on the last step to sigma 0.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}.")
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        down, up = ancestral_split(s, s_next, eta)
        if down == 0:
            run.x = denoised  # Euler down to 0
        else:
            s_mid = math.sqrt(s * down)
            run.x = _exp_step(run.x, s, down, run.denoise(_exp_step(run.x, s, s_mid, denoised), s_mid))
        if up > 0:
            run.x = run.x + _randn_like(run.x, generator) * up
        run.report(i, s, s_next, denoised)
    return run.result()


def _unipc_rhos(rs: list[float], h: float, b_h: float) -> list[float]:
    """The UniPC coefficients a of the order conditions R a = g / B (Zhao et al. 2023, UniC-p and
    UniP-p): R[m][j] = r_j^m and g_m = (m+1)! z phi_{m+2}(z), m = 0 .. k-1, with z = -h (data
    prediction) and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z; a single unknown takes the paper's a = 1/2
    (as its code and diffusers do). Returns: len(rs) floats."""
    if len(rs) == 1:
        return [0.5]
    z = -h
    g, fact, rhs = math.expm1(z) / z - 1, 1, []  # g = z phi_2(z); phi_{k+1} = (phi_k - 1/k!) / z
    for m in range(1, len(rs) + 1):
        rhs.append(fact * g / b_h)
        fact *= m + 1
        g = g / z - 1 / fact
    return np.linalg.solve(np.vander(rs, increasing=True).T, np.array(rhs)).tolist()


def _unipc_update(x: Tensor, nodes: list[tuple[float, Tensor]], sigma_next: float, solver_type: str) -> Tensor:
    """One UniPC update from nodes[0] = (sigma, D at sigma) to sigma_next, with the other nodes
    (sigma_j, D_j) as differences (D_j - D) / r_j, r_j = log(sigma / sigma_j) / h: the predictor
    passes earlier estimates, the corrector also the estimate at sigma_next (r = 1).
    Returns: the state at sigma_next, shaped like x."""
    (s, d), others = nodes[0], nodes[1:]
    x_next = _exp_step(x, s, sigma_next, d)
    if not others:
        return x_next
    h = math.log(s / sigma_next)
    b_h = -h if solver_type == "bh1" else math.expm1(-h)  # B1(z) = z, B2(z) = e^z - 1, at z = -h
    rs = [math.log(s / s_j) / h for s_j, _ in others]
    rhos = _unipc_rhos(rs, h, b_h)
    return x_next - b_h * sum(rho * (d_j - d) / r for rho, r, (_, d_j) in zip(rhos, rs, others, strict=True))


def sample_unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                 callback: SamplerCallback | None = None, order: int = 2, solver_type: str = "bh2",
                 corrector: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023), data prediction: the predictor UniP-p (order `p` = `order`, from
    the last p x0 estimates) and the corrector UniC-p, which redoes the last step once the
    denoiser has been evaluated at its end, using that evaluation as one more node: order p + 1
    for no extra call (the evaluation is the one the next step needs anyway; it is not repeated
    at the corrected point). `solver_type` names B(h): "bh1" = h, "bh2" = e^h - 1 (the default,
    as in diffusers; the two differ only where one coefficient is the paper's 1/2). Orders rise
    from 1 while estimates accumulate; the step to sigma 0 is first order; the last step is not
    corrected (nothing is evaluated after it). `corrector=False` is UniP alone
    (order 2 with bh2 is DPM-Solver++(2M)). `order` in 1 .. 3. One denoiser call per step.
    The callback's `x` is the predictor's value; the corrector updates it at the next step.
    `generator` is unused.

    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3, got {order}.")
    if solver_type not in ("bh1", "bh2"):
        raise ConfigError(f"Unknown UniPC solver_type {solver_type!r}; use 'bh1' or 'bh2'.")
    sig, run = _check_sigmas(sigmas), _Run(denoiser, x, callback)
    nodes: list[tuple[float, Tensor]] = []  # (sigma, x0 estimate), newest first
    x_prev, used = run.x, 0  # the state the last predictor started from, and how many nodes it used
    for i, (s, s_next) in enumerate(pairwise(sig)):
        denoised = run.denoise(run.x, s)
        if corrector and nodes:
            run.x = _unipc_update(x_prev, [*nodes[:used], (s, denoised)], s, solver_type)
        nodes = [(s, denoised), *nodes][:order]
        used = 1 if s_next == 0 else len(nodes)
        x_prev, run.x = run.x, _unipc_update(run.x, nodes[:used], s_next, solver_type)
        run.report(i, s, s_next, denoised)
    return run.result()


# --- registry -----------------------------------------------------------------------------------

def sample_consistency(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                       callback: SamplerCallback | None = None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): jump to x0 = D(x, sigma), then re-noise it
    to the next sigma (fresh noise from `generator`) and jump again; the last jump is the sample. With
    sigmas [sigma_max, 0] it is one network evaluation. For consistency models (diffusion/consistency.py).
    Returns: samples shaped like x, at noise level sigmas[-1].
    """
    return _sample_ancestral(denoiser, x, sigmas, lambda s, s_next: (0.0, s_next), generator, callback)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "ipndm": sample_ipndm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "unipc": sample_unipc,
    "consistency": sample_consistency,
}
_TWO_CALLS_PER_STEP = ("heun", "dpmpp_2s_ancestral")


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered as `name`. Returns: one of the `sample_*` functions."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.") from None


def nfe(name: str, steps: int, ends_at_zero: bool = True) -> int:
    """The honest number of denoiser evaluations for `steps` steps (len(sigmas) = steps + 1):
    one per step, except heun's and dpmpp_2s_ancestral's two per step, minus one when their last
    step goes to sigma 0 (for dpmpp_2s_ancestral with eta <= 1; a larger eta can send more steps'
    deterministic part to 0, each saving a call). UniPC's corrector reuses the next step's
    evaluation and costs nothing. (A guided denoiser makes each evaluation one network call of
    twice the batch.) Returns: int >= 0.
    """
    get_sampler(name)
    if name in _TWO_CALLS_PER_STEP:
        return 2 * steps - (1 if ends_at_zero and steps > 0 else 0)
    return steps


def steps_for_budget(name: str, budget: int, ends_at_zero: bool = True) -> int:
    """The most steps whose honest `nfe` is at most `budget` (heun and dpmpp_2s_ancestral:
    (budget + 1) // 2; the others: budget). Returns: int >= 1 (1 even when one step costs more)."""
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"The NFE budget must be a positive integer, got {budget!r}; pass e.g. nfe=10.")
    steps = budget
    while steps > 1 and nfe(name, steps, ends_at_zero) > budget:
        steps -= 1
    return steps

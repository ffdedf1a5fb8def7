"""Guidance as wrappers: a denoiser in, a denoiser out; samplers never know.

Ho & Salimans 2022 ("Classifier-Free Diffusion Guidance", eq. 6) extrapolate from the
unconditional prediction towards the conditional one. In x0 terms (equivalent to their eps form
for a fixed x and sigma, since x0_hat = x - sigma * eps_hat is affine in eps_hat):

    D_guided = D(x, sigma | uncond) + scale * (D(x, sigma | cond) - D(x, sigma | uncond))

scale = 1 is the plain conditional model, 0 the unconditional one, > 1 (Stable Diffusion's
default 7.5) trades diversity for adherence. A negative prompt/label is simply what is passed
as `uncond` (it replaces the empty/null condition). `rescale` is Lin et al. 2024's fix for the
over-saturation of large scales ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
sec. 3.4): the guided noise prediction is rescaled to the standard deviation of the conditional
one, then mixed with the plain guided prediction by the factor `rescale` (0.7 in the paper).

Gradient guidance (the lesson's "magic function": a model that scores an image gives, through its
gradient with respect to the pixels, a direction that improves the image). For a differentiable
`log_prob(x0_hat) -> (B,)` (a classifier's log p(y | x0), a CLIP similarity), the guided score is
grad_x log p(x) + scale * grad_x log_prob(x0_hat(x)) (classifier guidance, Dhariwal & Nichol 2021,
with the scorer read on the denoised estimate as in "universal guidance"). Since grad_x log p(x) =
(D(x, sigma) - x) / sigma^2 in our scaling, that is the denoiser

    D_guided(x, sigma) = D(x, sigma) + scale * sigma^2 * grad_x log_prob(D(x, sigma)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from .samplers import Denoiser

__all__ = ["cfg_denoiser", "gradient_guidance"]


def _expand(value: Tensor, batch: int, name: str) -> Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:  # one null/negative condition for the whole batch
        return value.expand(batch, *value.shape[1:])
    raise ConfigError(f"Condition {name!r} has batch size {value.shape[0]}, expected {batch} (or 1).")


def _rescaled(x: Tensor, sigma: Tensor, d_cond: Tensor, d_guided: Tensor, rescale: float) -> Tensor:
    """Lin et al.'s rescale in noise space: eps_g * std(eps_c) / std(eps_g), mixed by `rescale`; back to x0 space."""
    s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    eps_c, eps_g = (x - d_cond) / s, (x - d_guided) / s
    dims = tuple(range(1, x.ndim))
    fixed = eps_g * (eps_c.std(dim=dims, keepdim=True) / eps_g.std(dim=dims, keepdim=True).clamp(min=1e-12))
    eps = rescale * fixed + (1 - rescale) * eps_g
    return x - s * eps


def cfg_denoiser(denoiser: Denoiser, cond: dict[str, Tensor], uncond: dict[str, Tensor],
                 scale: float, rescale: float = 0.0) -> Denoiser:
    """Guided denoiser `(x, sigma, **shared) -> x0_hat` for `sample_*` functions.

    `cond` / `uncond`: the same keys, tensor values of shape (B, ...) (an `uncond` value of batch 1
    is broadcast). Both branches are evaluated in ONE denoiser call on the batch concatenated as
    [uncond; cond] (so a network sees batch 2B); scale == 1 calls only the cond branch and
    scale == 0 only the uncond one, so those equal the plain denoiser exactly. Extra keyword
    conditions given at call time (`shared`, e.g. a low-resolution image) go to both branches.
    `rescale` in [0, 1] applies guidance rescale (module docstring; 0: off).
    Returns: a denoiser whose output is shaped like x, in x's dtype.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ConfigError(f"rescale must be in [0, 1], got {rescale}")
    if set(cond) != set(uncond):
        raise ConfigError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}.")
    if scale == 1 or scale == 0:
        only = cond if scale == 1 else uncond

        def single(x: Tensor, sigma: Tensor, **shared: Tensor) -> Tensor:
            return denoiser(x, sigma, **{k: _expand(v, x.shape[0], k) for k, v in only.items()}, **shared)

        return single

    def guided(x: Tensor, sigma: Tensor, **shared: Tensor) -> Tensor:
        b = x.shape[0]
        both = {k: torch.cat([_expand(uncond[k], b, k), _expand(cond[k], b, k)]) for k in cond}
        both.update({k: torch.cat([v, v]) for k, v in shared.items()})
        sigma = torch.as_tensor(sigma, device=x.device).expand(b)
        d_uncond, d_cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        d = d_uncond + scale * (d_cond - d_uncond)
        return _rescaled(x, sigma, d_cond, d, rescale) if rescale else d

    return guided


def gradient_guidance(denoiser: Denoiser, log_prob: Callable[[Tensor], Tensor], scale: float) -> Denoiser:
    """Denoiser D + scale * sigma^2 * grad_x log_prob(D(x, sigma)) (module docstring): gradient guidance.

    `log_prob(x0_hat) -> (B,)` is any differentiable score of the denoised estimate (higher = more of
    what is wanted). The gradient flows through the denoiser, which is evaluated with gradients on
    even when the sampler runs under no_grad. scale = 0 returns `denoiser` itself.
    Returns: a denoiser whose output is shaped like x, in x's dtype.
    """
    if not math.isfinite(scale):
        raise ConfigError(f"the gradient-guidance scale must be a finite number, got {scale}")
    if scale == 0:
        return denoiser

    def guided(x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = denoiser(xg, sigma, **cond)
            (grad,) = torch.autograd.grad(log_prob(d).sum(), xg)
        s = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (d.detach() + scale * s**2 * grad).to(x.dtype)

    return guided

"""Classifier-free guidance as a wrapper: a denoiser in, a denoiser out; samplers never know.

Ho & Salimans 2022 ("Classifier-Free Diffusion Guidance", eq. 6) extrapolate from the
unconditional prediction towards the conditional one. In x0 terms (equivalent to their eps form
for a fixed x and sigma, since x0_hat = x - sigma * eps_hat is affine in eps_hat):

    D_guided = D(x, sigma | uncond) + scale * (D(x, sigma | cond) - D(x, sigma | uncond))

scale = 1 is the plain conditional model, 0 the unconditional one, > 1 (Stable Diffusion's
default 7.5) trades diversity for adherence. A negative prompt/label is simply what is passed
as `uncond` (it replaces the empty/null condition).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .samplers import Denoiser

__all__ = ["cfg_denoiser"]


def _expand(value: Tensor, batch: int, name: str) -> Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:  # one null/negative condition for the whole batch
        return value.expand(batch, *value.shape[1:])
    raise ConfigError(f"Condition {name!r} has batch size {value.shape[0]}, expected {batch} (or 1).")


def cfg_denoiser(denoiser: Denoiser, cond: dict[str, Tensor], uncond: dict[str, Tensor],
                 scale: float) -> Denoiser:
    """Guided denoiser `(x, sigma, **shared) -> x0_hat` for `sample_*` functions.

    `cond` / `uncond`: the same keys, tensor values of shape (B, ...) (an `uncond` value of batch 1
    is broadcast). Both branches are evaluated in ONE denoiser call on the batch concatenated as
    [uncond; cond] (so a network sees batch 2B); scale == 1 calls only the cond branch and
    scale == 0 only the uncond one, so those equal the plain denoiser exactly. Extra keyword
    conditions given at call time (`shared`, e.g. a low-resolution image) go to both branches.
    Returns: a denoiser whose output is shaped like x, in x's dtype.
    """
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
        return d_uncond + scale * (d_cond - d_uncond)

    return guided

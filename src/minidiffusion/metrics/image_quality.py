"""Reconstruction quality, image by image: PSNR and SSIM on the project's [-1, 1] images.

PSNR = 10 log10(range^2 / MSE) with range = 2 (the span of [-1, 1]): the number autoencoder
tables quote (Stable Diffusion's f=8 VAE: 23.4-24.5 dB on COCO 256x256). SSIM (Wang et al. 2004)
compares local means, variances and covariances under an 11x11 Gaussian window (sigma 1.5),
with C1 = (0.01 range)^2 and C2 = (0.03 range)^2, averaged over the pixels whose window lies
inside the image and over channels: the definition scikit-image computes with
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False` (a test checks it equals that).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.images import check_range

__all__ = ["psnr", "ssim", "sharpness", "mean_finite", "DATA_RANGE"]

DATA_RANGE = 2.0  # images live in [-1, 1]


def _pair(x: Tensor, y: Tensor, where: str) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{where}: expected two image batches [N, C, H, W] of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    check_range(x, f"{where} (first argument)", allow_unusual=True)
    check_range(y, f"{where} (second argument)", allow_unusual=True)
    return x.double().clamp(-1, 1), y.double().clamp(-1, 1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Return the PSNR in dB of each image pair: float64 (N,), +inf where the images are equal.

    x, y: float images [N, C, H, W] in [-1, 1] (values are clamped to it first).
    """
    x, y = _pair(x, y, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(DATA_RANGE**2 / mse)


def sharpness(x: Tensor, reference: Tensor) -> Tensor:
    """Return each image's detail relative to its reference: mean squared Laplacian (3x3, per channel, interior
    pixels) of x over that of the reference, float64 (N,). 1: as much fine detail as the reference; a blurred
    image (bicubic upscaling) is below 1; noise or ringing can push it above.

    x, reference: float images [N, C, H, W] in [-1, 1] of one shape (values are clamped to it first).
    """
    x, reference = _pair(x, reference, "sharpness")
    k = x.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)

    def energy(z: Tensor) -> Tensor:
        lap = F.conv2d(z.flatten(0, 1)[:, None], k)  # valid convolution: the border is not scored
        return lap.pow(2).view(len(z), -1).mean(1)

    return energy(x) / energy(reference).clamp(min=1e-12)


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rule: 5 for sigma 1.5, an 11-tap window
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _blur(x: Tensor, w: Tensor) -> Tensor:
    """Separable Gaussian filter over H and W, 'valid' (no padding): (N*C, 1, H-10, W-10) for an 11-tap w."""
    k = len(w)
    x = F.conv2d(x, w.view(1, 1, 1, k).to(x))
    return F.conv2d(x, w.view(1, 1, k, 1).to(x))


def ssim(x: Tensor, y: Tensor, sigma: float = 1.5) -> Tensor:
    """Return the mean SSIM of each image pair: float64 (N,), in [-1, 1], 1 where the images are equal.

    x, y: float images [N, C, H, W] in [-1, 1], H and W at least the window size (11 for sigma 1.5).
    """
    x, y = _pair(x, y, "ssim")
    w = _gaussian_window(sigma)
    n, c, h, wd = x.shape
    if min(h, wd) < len(w):
        raise ValueError(f"ssim: images of {h}x{wd} are smaller than the {len(w)}x{len(w)} window")
    a, b = x.reshape(n * c, 1, h, wd), y.reshape(n * c, 1, h, wd)
    mu_a, mu_b = _blur(a, w), _blur(b, w)
    var_a = _blur(a * a, w) - mu_a**2
    var_b = _blur(b * b, w) - mu_b**2
    cov = _blur(a * b, w) - mu_a * mu_b
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(n, c, -1).mean(dim=(1, 2))


def mean_finite(values: Tensor) -> float:
    """Return the mean of the finite entries of a (N,) tensor (PSNR of identical pairs is +inf), NaN if none."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan

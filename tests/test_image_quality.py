"""PSNR and SSIM against scikit-image (a test-only oracle) and against their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from minidiffusion.metrics.image_quality import psnr, ssim


def _images(n=3, c=3, s=32, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, s, s, generator=g) * 2 - 1).double()
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some spatial structure, as images have
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x.float(), y.float()


def test_psnr_matches_scikit_image_and_the_closed_form():
    x, y = _images()
    ours = psnr(x, y)
    for i in range(len(x)):
        ref = peak_signal_noise_ratio(x[i].double().numpy(), y[i].double().numpy(), data_range=2.0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-9)
    mse = 0.01
    same = psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)).item()
    assert same == pytest.approx(10 * math.log10(4 / mse))
    assert psnr(x, x).isinf().all()


@pytest.mark.parametrize("c", [1, 3])
def test_ssim_matches_scikit_image(c):
    x, y = _images(c=c, s=40)
    ours = ssim(x, y)
    for i in range(len(x)):
        a, b = x[i].double().numpy(), y[i].double().numpy()
        ref = structural_similarity(a, b, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, channel_axis=0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-9)


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    x, y = _images()
    assert torch.allclose(ssim(x, x), torch.ones(len(x), dtype=torch.float64))
    noisier = (x + 0.4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert (ssim(x, noisier) < ssim(x, y)).all() and (ssim(x, y) < 1).all()


def test_refusals():
    x, _ = _images()
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:, :1])
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        ssim(x * 255, x)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    assert np.isfinite(psnr(x, -x).numpy()).all()

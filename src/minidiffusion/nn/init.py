"""Weight initialisation: Kaiming for convs/linears, LSUV (layer-sequential unit variance), and a
data-dependent PCA init for the first convolution."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import check_range

__all__ = ["init_kaiming", "lsuv_init", "pca_init_"]


def init_kaiming(model: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """Kaiming-normal init (fan_in) for every Conv2d/Linear whose weight is not all zero; return model.

    Zero weights are left alone: they are the deliberate identity-init of residual branches.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.abs().sum() > 0:
            nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


@torch.no_grad()
def lsuv_init(model: nn.Module, xb: torch.Tensor, layers: list[nn.Module] | None = None,
              tol: float = 0.02, max_iter: int = 10,
              forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[tuple[float, float]]:
    """LSUV (Mishkin & Matas 2016): rescale each layer so its output on `xb` has mean 0 and std 1.

    `layers` defaults to every Conv2d/Linear with a non-zero weight. Returns the final (mean, std)
    of each layer's output, in order.
    """
    layers = layers or [m for m in model.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.abs().sum() > 0]
    forward = forward or model
    stats: list[tuple[float, float]] = []
    was_training = model.training
    model.eval()
    for layer in layers:
        captured: dict[str, torch.Tensor] = {}

        def grab(module, inputs, output, captured=captured):
            captured["o"] = output

        hook = layer.register_forward_hook(grab)
        try:
            for _ in range(max_iter):
                forward(xb)
                out = captured["o"]
                mean, std = out.mean().item(), out.std().item()
                if abs(mean) < tol and abs(std - 1) < tol:
                    break
                if layer.bias is not None:
                    layer.bias -= mean
                layer.weight /= max(std, 1e-8)
            forward(xb)
            stats.append((captured["o"].mean().item(), captured["o"].std().item()))
        finally:
            hook.remove()
    model.train(was_training)
    return stats


@torch.no_grad()
def pca_init_(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """Set `conv`'s filters to its input patches' leading principal components; return all eigenvalues.

    `images` is [N, C, H, W] in [-1, 1] (a few thousand are plenty). Filter 2i and 2i+1 are the
    i-th component and its negative, so a ReLU after the conv keeps both signs; every filter gets
    the norm a Kaiming-normal filter has on average (sqrt(2)), so with a BatchNorm after the conv
    the channels start decorrelated and of unit variance (whitened). The bias, if any, is zeroed.
    Eigenvalues come in descending order (units: squared pixel values, pixels in [-1, 1]).
    """
    k, dim = conv.kernel_size, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    n_comp = math.ceil(conv.out_channels / 2)
    if conv.groups != 1 or isinstance(conv.padding, str):
        raise ValueError("pca_init_ needs an ungrouped Conv2d with numeric padding")
    if n_comp > dim:
        raise ValueError(f"pca_init_: {conv.out_channels} filters need {n_comp} components, but "
                         f"{conv.in_channels}x{k[0]}x{k[1]} patches have only {dim}")
    if images.ndim != 4 or images.shape[1] != conv.in_channels:
        raise ValueError(f"pca_init_: images must be [N, {conv.in_channels}, H, W], got {tuple(images.shape)}")
    check_range(images, "pca_init_")
    patches = F.unfold(images.double(), k, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    patches = patches.transpose(1, 2).reshape(-1, dim)
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(patches.T))  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    comps = eigvecs[:, :n_comp].T * math.sqrt(2)  # [n_comp, dim], each of norm sqrt(2)
    filters = torch.stack([comps, -comps], dim=1).reshape(2 * n_comp, dim)[: conv.out_channels]
    conv.weight.copy_(filters.reshape_as(conv.weight).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()
    return eigvals.float()

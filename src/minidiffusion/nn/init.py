"""Weight initialisation: Kaiming for convs/linears, and LSUV (layer-sequential unit variance)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["init_kaiming", "lsuv_init"]


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

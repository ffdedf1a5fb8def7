"""Activation statistics through forward hooks: means, stds, dead fraction, histograms.

Healthy training keeps each layer's activations near mean 0 / std 1; a std collapsing
towards 0, or most activations stuck near zero, shows a bad init or a too-high LR early.
The "colorful dimension" plot (from the fast.ai course) stacks each batch's histogram of
|activation| as one column, log-coloured: a smooth band is good, a bright bottom row that
keeps coming back means activations collapse to zero again and again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .callback import Callback
from .plotting import new_figure, save_figure

__all__ = ["ActivationStatsCB", "LayerStats", "default_layers"]

_PARAM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)


def _is_block(m: nn.Module) -> bool:
    return "resblock" in type(m).__name__.lower() or "residualblock" in type(m).__name__.lower()


def default_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) for each ResBlock-like module and each Conv/Linear outside those blocks."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if _is_block(child) or (isinstance(child, _PARAM_LAYERS) and any(True for _ in child.parameters())):
            yield full, child
        else:
            yield from default_layers(child, full)


class LayerStats:
    """Per-batch statistics of one layer's output, kept on the device until read.

    Properties return CPU tensors: `mean`, `std`, `near_zero` (fraction |a| < eps) of shape
    [n_batches], and `hist` [n_batches, bins] (counts of |a| in `hist_range`).
    """

    def __init__(self, eps: float, bins: int, hist_range: tuple[float, float], train_only: bool):
        self.eps, self.bins, self.hist_range, self.train_only = eps, bins, hist_range, train_only
        self._rows: list[torch.Tensor] = []  # each: [3 + bins] = mean, std, near_zero, histogram

    def record(self, module: nn.Module, inputs: tuple, output) -> None:
        """Forward hook: append this batch's statistics of `output` (training batches only, by default)."""
        if self.train_only and not module.training:
            return
        a = (output[0] if isinstance(output, (tuple, list)) else output).detach().float()
        mag = a.abs()
        stats = torch.stack([a.mean(), a.std(), (mag < self.eps).float().mean()])
        self._rows.append(torch.cat([stats, torch.histc(mag, self.bins, *self.hist_range)]))

    def _table(self) -> torch.Tensor:
        return torch.stack(self._rows).cpu() if self._rows else torch.zeros(0, 3 + self.bins)

    mean = property(lambda self: self._table()[:, 0])
    std = property(lambda self: self._table()[:, 1])
    near_zero = property(lambda self: self._table()[:, 2])
    hist = property(lambda self: self._table()[:, 3:])


class ActivationStatsCB(Callback):
    """Record activation statistics of chosen layers with forward hooks during fit (removed at fit end).

    `modules_filter(name, module) -> bool` picks the layers (all named submodules are tried); by
    default every ResBlock-like module and every Conv/Linear outside one (see `default_layers`).
    `eps` is the |activation| below which a value counts as "near zero"; `hist_range` the |a| range of
    the `bins` histogram bins. Results: `self.stats[name]` (LayerStats).
    """

    order = -1
    skip_in_lr_find = True

    def __init__(self, modules_filter: Callable[[str, nn.Module], bool] | None = None, eps: float = 1e-3,
                 bins: int = 40, hist_range: tuple[float, float] = (0.0, 10.0), train_only: bool = True):
        self.modules_filter, self.eps, self.bins = modules_filter, eps, bins
        self.hist_range, self.train_only = hist_range, train_only
        self.stats: dict[str, LayerStats] = {}
        self._handles: list = []

    def before_fit(self, learn) -> None:
        if self.modules_filter is None:
            layers = list(default_layers(learn.model))
        else:
            layers = [(n or "model", m) for n, m in learn.model.named_modules() if self.modules_filter(n, m)]
        if not layers and isinstance(learn.model, _PARAM_LAYERS):
            layers = [("model", learn.model)]
        self.stats = {n: LayerStats(self.eps, self.bins, self.hist_range, self.train_only) for n, _ in layers}
        self._handles = [m.register_forward_hook(self.stats[n].record) for n, m in layers]

    def cleanup_fit(self, learn) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def plot_stats(self, path: str | Path) -> Path:
        """Write means, stds and near-zero fractions per batch (one line per layer) as a PNG; returns path."""
        fig, axes = new_figure(1, 3, size=(4.5, 3.5))
        for name, s in self.stats.items():
            for ax, values in zip(axes[0], (s.mean, s.std, s.near_zero), strict=True):
                ax.plot(values.numpy(), label=name)
        for ax, title in zip(axes[0], ("mean", "std", f"fraction |a| < {self.eps:g}"), strict=True):
            ax.set(title=title, xlabel="batch")
        axes[0, 0].legend(fontsize="small")
        return save_figure(fig, path)

    def color_dim(self, path: str | Path) -> Path:
        """Write the "colorful dimension" plot (|a| histograms per batch, log colour) as PNG; returns path."""
        n = max(len(self.stats), 1)
        cols = min(n, 4)
        rows = -(-n // cols)
        fig, axes = new_figure(rows, cols, size=(3.5, 3.0))
        for ax, (name, s) in zip(axes.flat, self.stats.items(), strict=False):
            ax.imshow(s.hist.T.log1p().numpy(), origin="lower", aspect="auto", cmap="viridis",
                      extent=(0, max(len(s.hist), 1), *self.hist_range))
            ax.set(title=name, xlabel="batch", ylabel="|activation|")
        for ax in list(axes.flat)[len(self.stats):]:
            ax.axis("off")
        return save_figure(fig, path)

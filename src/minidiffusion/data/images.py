"""The one place where images change format.

The project's canonical image tensor is float32, NCHW, values in [-1, 1].
Every converter between that and uint8 arrays, PIL images or PNG grids lives
here, and `check_range` guards the boundaries where a wrong range would give
silently wrong numbers (the course's FID bug).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..paths import atomic_write

__all__ = ["uint8_to_float", "float_to_uint8", "pad_to", "check_range", "to_pil", "make_grid", "save_grid",
           "save_labelled_grid", "save_png"]


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """Return uint8 pixels (0..255, any shape) as float32 in [-1, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"uint8_to_float expects a uint8 tensor, got {x.dtype}")
    return x.float().div_(127.5).sub_(1.0)


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Return float images in [-1, 1] (clamped) as uint8 pixels 0..255, same shape."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pad_to(x: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Return [..., H, W] images padded symmetrically to [..., size, size] with `value` (background -1)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to the smaller size {size}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=value)


def check_range(x: torch.Tensor, where: str, *, allow_unusual: bool = False) -> None:
    """Raise ValueError unless float images `x` look like the canonical [-1, 1] range.

    Flags values outside [-1.05, 1.05], and batches that only span [0, 1] or
    [-0.6, 0.6] (the usual symptoms of a forgotten rescale). `allow_unusual=True`
    skips the spread checks for data that really is low-contrast.
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"{where}: expected float images in [-1, 1], got dtype {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: images contain NaN or inf")
    if lo < -1.05 or hi > 1.05:
        raise ValueError(f"{where}: values span [{lo:.3f}, {hi:.3f}], outside [-1, 1]; "
                         "convert uint8 pixels with uint8_to_float or rescale x*2-1")
    if allow_unusual:
        return
    if lo >= -0.05:
        raise ValueError(f"{where}: values span [{lo:.3f}, {hi:.3f}], which looks like [0, 1] images; "
                         "the contract is [-1, 1] (use x*2-1), or pass allow_unusual=True if this is real")
    if lo > -0.6 and hi < 0.6:
        raise ValueError(f"{where}: values span [{lo:.3f}, {hi:.3f}], which looks like [-0.5, 0.5] images; "
                         "the contract is [-1, 1] (use x*2), or pass allow_unusual=True if this is real")


def to_pil(x: torch.Tensor):
    """Return one [C, H, W] image in [-1, 1] (C = 1 or 3) as a PIL image."""
    from PIL import Image

    arr = float_to_uint8(x).cpu().numpy()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), mode="RGB")


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Return a batch [N, C, H, W] in [-1, 1] tiled into one [C, H', W'] image, `nrow` images per row."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = x.new_full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save a batch [N, C, H, W] in [-1, 1] as one PNG grid (nearest-upscaled by `scale`); return the path."""
    img = to_pil(make_grid(x.detach().float().cpu(), nrow=nrow))
    if scale > 1:
        from PIL import Image

        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return save_png(img, path)


def save_png(img, path: str | Path) -> Path:
    """Write a PIL image as a PNG at `path`, atomically (never half a file); return the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_labelled_grid(x: torch.Tensor, row_labels: list[str], path: str | Path, scale: int = 2) -> Path:
    """Save a batch [rows * cols, C, H, W] in [-1, 1] as a PNG grid, one row per label, the label
    written to the left of its row; return the path."""
    from PIL import Image, ImageDraw

    rows = len(row_labels)
    if rows == 0 or len(x) % rows:
        raise ValueError(f"save_labelled_grid: {len(x)} images do not split into {rows} rows")
    cols = len(x) // rows
    grid = to_pil(make_grid(x.detach().float().cpu(), nrow=cols))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(grid)
    margin = max(int(draw.textlength(label)) for label in row_labels) + 12
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = grid.height / rows
    for i, label in enumerate(row_labels):
        draw.text((4, int(row_h * i + row_h / 2 - 5)), label, fill="black")
    return save_png(canvas, path)

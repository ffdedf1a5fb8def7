"""TrivialAugment (Müller & Hutter 2021) on tensors: one random op of random strength per image.

Each image of a batch [B, C, H, W] in [-1, 1] gets one op drawn uniformly from `OPS` and a strength drawn
uniformly from `NUM_BINS` levels, with a random sign for the signed ops; then, optionally, a random crop
(pad + crop back), a horizontal flip and random erasing, as the course's per-item pipeline did. The ranges
are TrivialAugment-*wide*'s (torchvision's `TrivialAugmentWide`), written for float tensors on any device:

    identity, autocontrast, equalize                    no strength
    brightness, contrast, color, sharpness              factor 1 +- 0.99 * m (PIL's ImageEnhance blends)
    posterize                                           keep 8 - round(6 m) bits (8 .. 2)
    solarize                                            invert pixels >= 1 - m (in [0, 1] units)
    rotate                                              +- 135 m degrees
    shear_x, shear_y                                    +- 0.99 m (the tangent of the shear)
    translate_x, translate_y                            +- 0.5 m of the side (TA-wide's 32 px at 64 px)

where m in [0, 1] is the strength. Two departures from torchvision, both chosen for tensors: geometric ops
sample bilinearly about the image centre (torchvision: nearest, shear about the top-left corner), and
translations are a fraction of the side, so the same parameters mean the same geometry at any resolution.
`equalize` is PIL's exact algorithm on the image quantised to 256 levels (so it is exact for images that
came from uint8, approximate otherwise).

Paired tensors (a super-resolution input and target) get identical ops with `TrivialAugment.pair`: one draw
of parameters, applied to every tensor in normalised coordinates and the crop scaled by each tensor's size.
Ops run per group of images sharing an op, on the batch's device; no per-item Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import random_erase

__all__ = ["OPS", "GEOMETRIC", "NUM_BINS", "apply_op", "AugmentParams", "sample_params", "apply_params",
           "TrivialAugment"]

OPS = ("identity", "brightness", "contrast", "color", "sharpness", "posterize", "solarize", "autocontrast",
       "equalize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
GEOMETRIC = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
UNSIGNED = frozenset({"identity", "posterize", "solarize", "autocontrast", "equalize"})
NUM_BINS = 31  # strength levels 0, 1/30, ..., 1 (TrivialAugment's 31 bins)
MAX_ROTATE = 135.0  # degrees
MAX_SHEAR = 0.99
MAX_TRANSLATE = 0.5  # of the side
MAX_ENHANCE = 0.99  # brightness/contrast/color/sharpness factor 1 +- this


def _gray(y: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of images in [0, 1] (ITU-R 601-2, as PIL's convert("L")); gray images pass through."""
    if y.shape[1] != 3:
        return y[:, :1]
    return 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]


def _blend(degenerate: torch.Tensor, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (y - degenerate), clamped to [0, 1]; factor [B]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (y - degenerate)).clamp(0, 1)


def _smooth(y: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5, total 13), border pixels unchanged (PIL's sharpness)."""
    c = y.shape[1]
    k = torch.ones(3, 3, dtype=y.dtype, device=y.device)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    out = y.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(y, k, groups=c)
    return out


def _equalize(y: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel, on `y` quantised to 256 levels."""
    b, c, h, w = y.shape
    v = (y * 255).round().long().flatten(2)  # [B, C, HW] in 0..255
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=y.device).scatter_add_(2, v, torch.ones_like(v))
    last = 255 - (hist > 0).flip(-1).long().argmax(-1, keepdim=True)  # the highest level present
    step = (h * w - hist.gather(2, last)) // 255  # [B, C, 1]
    lut = (torch.cumsum(hist, 2) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, (1, 0))[..., :-1].clamp(0, 255)  # level i maps to the count below it
    out = lut.gather(2, v).to(y.dtype) / 255
    return torch.where(step > 0, out, v.to(y.dtype) / 255).view(b, c, h, w)


def _affine(y: torch.Tensor, op: str, m: torch.Tensor, fill: float, mode: str) -> torch.Tensor:
    """Rotate / shear / translate each image by its signed strength m [B], about the centre; outside: fill."""
    b, _, h, w = y.shape
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    if op == "rotate":
        a = torch.deg2rad(MAX_ROTATE * m)
        mat = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1)
    elif op == "shear_x":
        mat = torch.stack([one, MAX_SHEAR * m, zero, one], -1)
    elif op == "shear_y":
        mat = torch.stack([one, zero, MAX_SHEAR * m, one], -1)
    else:
        mat = torch.stack([one, zero, zero, one], -1)
    mat = mat.view(b, 2, 2)
    # pixel offsets from the centre -> affine_grid's [-1, 1] coordinates: scale x by 2/W, y by 2/H
    d = torch.tensor([w / 2, h / 2], dtype=y.dtype, device=y.device)
    mat = mat * d.view(1, 1, 2) / d.view(1, 2, 1)  # D^-1 A D
    shift = torch.zeros(b, 2, dtype=y.dtype, device=y.device)
    if op == "translate_x":
        shift[:, 0] = 2 * MAX_TRANSLATE * m
    elif op == "translate_y":
        shift[:, 1] = 2 * MAX_TRANSLATE * m
    theta = torch.cat([mat, shift[:, :, None]], 2)  # maps output coordinates to where they are read
    grid = F.affine_grid(theta, list(y.shape), align_corners=False)
    ones = torch.ones_like(y[:, :1])
    out = F.grid_sample(torch.cat([y, ones], 1), grid, mode=mode, padding_mode="zeros", align_corners=False)
    inside = out[:, -1:]
    return out[:, :-1] + (1 - inside) * fill


def apply_op(x: torch.Tensor, op: str, magnitude: torch.Tensor | float, fill: float = -1.0,
             mode: str = "bilinear") -> torch.Tensor:
    """Return images x [B, C, H, W] in [-1, 1] transformed by `op` at signed strength `magnitude` ([B] or a
    number, in [-1, 1]; unsigned ops use its absolute value), same shape and range.

    `fill` ([-1, 1]) is what geometric ops show where the image moved away; `mode` their sampling
    (bilinear | nearest).
    """
    if op not in OPS:
        raise ValueError(f"unknown augmentation op {op!r}; use one of {', '.join(OPS)}")
    if op == "identity":
        return x
    m = torch.as_tensor(magnitude, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
    if op in UNSIGNED:
        m = m.abs()
    y = (x + 1) / 2  # ops are defined on [0, 1] (PIL's 0..255)
    if op in GEOMETRIC:
        y = _affine(y, op, m, (fill + 1) / 2, mode)
    elif op == "brightness":
        y = _blend(torch.zeros_like(y), y, 1 + MAX_ENHANCE * m)
    elif op == "contrast":
        y = _blend(_gray(y).mean(dim=(1, 2, 3), keepdim=True).expand_as(y), y, 1 + MAX_ENHANCE * m)
    elif op == "color":
        y = _blend(_gray(y).expand_as(y), y, 1 + MAX_ENHANCE * m)
    elif op == "sharpness":
        y = _blend(_smooth(y), y, 1 + MAX_ENHANCE * m)
    elif op == "posterize":
        keep = 2.0 ** (8 - torch.round(6 * m)).view(-1, 1, 1, 1)  # 2^bits levels kept
        step = 256 / keep
        y = torch.floor(torch.round(y * 255) / step) * step / 255
    elif op == "solarize":
        y = torch.where(y >= (1 - m).view(-1, 1, 1, 1), 1 - y, y)
    elif op == "autocontrast":
        lo, hi = y.amin(dim=(2, 3), keepdim=True), y.amax(dim=(2, 3), keepdim=True)
        y = torch.where(hi > lo, (y - lo) / (hi - lo).clamp(min=1e-12), y)
    elif op == "equalize":
        y = _equalize(y)
    return (y * 2 - 1).clamp(-1, 1)


@dataclass
class AugmentParams:
    """One draw of per-image parameters: op index [B] (into the ops drawn from), signed strength [B] in [-1, 1],
    flip bool [B], crop offsets int64 [B, 2] (rows, cols) in 0..2*pad."""

    op: torch.Tensor
    magnitude: torch.Tensor
    flip: torch.Tensor
    offset: torch.Tensor


def sample_params(n: int, n_ops: int, pad: int = 0, flip: float = 0.0, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> AugmentParams:
    """Return random AugmentParams for `n` images: an op among `n_ops`, one of NUM_BINS strengths with a
    random sign, a flip with probability `flip`, crop offsets for `pad`."""
    kw = {"generator": generator, "device": device}
    op = torch.randint(0, n_ops, (n,), **kw)
    strength = torch.randint(0, NUM_BINS, (n,), **kw).float() / (NUM_BINS - 1)
    sign = torch.where(torch.rand(n, **kw) < 0.5, -1.0, 1.0)
    flips = torch.rand(n, **kw) < flip
    offset = torch.randint(0, 2 * pad + 1, (n, 2), **kw)
    return AugmentParams(op, strength * sign, flips, offset)


def _crop_at(x: torch.Tensor, offset: torch.Tensor, pad: int, fill: float) -> torch.Tensor:
    """Return x padded by `pad` (value `fill`) and cut back to H x W at each image's offset [B, 2]."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=fill)
    rows = torch.arange(h, device=x.device) + offset[:, :1]  # [B, H]
    cols = torch.arange(w, device=x.device) + offset[:, 1:]  # [B, W]
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def apply_params(x: torch.Tensor, params: AugmentParams, ops: Sequence[str] = OPS, pad: int = 0,
                 fill: float = -1.0, mode: str = "bilinear", scale: int = 1) -> torch.Tensor:
    """Return x [B, C, H, W] in [-1, 1] with each image's op, then crop (`pad` * `scale` pixels, offsets times
    `scale`), then flip: same shape and range. `scale` is x's size over the size the crop offsets count in."""
    out = x.clone()
    for k, name in enumerate(ops):
        idx = torch.nonzero(params.op == k).flatten()
        if name != "identity" and len(idx):
            out[idx] = apply_op(x[idx], name, params.magnitude[idx], fill=fill, mode=mode)
    out = _crop_at(out, params.offset * scale, pad * scale, fill)
    return torch.where(params.flip.view(-1, 1, 1, 1), out.flip(-1), out)


@dataclass
class TrivialAugment:
    """Per-image TrivialAugment, then random crop (`pad` pixels), flip (probability `flip`) and random erasing
    (probability `erase`, see augment.random_erase); call it on a batch [B, C, H, W] in [-1, 1].

    `ops` restricts the op list (default all of OPS); `fill` is the value uncovered by geometric ops and the
    crop padding; a `generator` on the batch's device makes it reproducible (else torch's global RNG).
    """

    pad: int = 0
    flip: float = 0.5
    erase: float = 0.0
    fill: float = -1.0
    ops: tuple[str, ...] = OPS
    mode: str = "bilinear"
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.ops = tuple(self.ops)
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"TrivialAugment: ops must be a non-empty selection of {', '.join(OPS)}, got {self.ops}")
        if self.mode not in ("bilinear", "nearest"):
            raise ValueError(f"TrivialAugment: mode must be bilinear or nearest, got {self.mode!r}")

    def params(self, n: int, device: torch.device | str = "cpu") -> AugmentParams:
        """Return one random draw of parameters for `n` images."""
        return sample_params(n, len(self.ops), self.pad, self.flip, self.generator, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the augmented batch: same shape, in [-1, 1]."""
        out = apply_params(x, self.params(len(x), x.device), self.ops, self.pad, self.fill, self.mode)
        return random_erase(out, self.erase, generator=self.generator) if self.erase else out

    def pair(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return each batch of `xs` (same B, sizes integer multiples of the smallest) with the *same* per-image
        op, strength, crop and flip: a low-resolution input stays aligned with its target. `pad` counts pixels of
        the smallest tensor. No erasing: erase the input alone afterwards if wanted (augment.random_erase)."""
        if not xs:
            return []
        small = min(xs, key=lambda t: t.shape[-1])
        h, w = small.shape[-2:]
        scales = [x.shape[-1] // w for x in xs]
        if any(len(x) != len(small) or tuple(x.shape[-2:]) != (h * s, w * s) for x, s in zip(xs, scales, strict=True)):
            raise ValueError("TrivialAugment.pair needs batches of one length whose sizes are integer multiples "
                             f"of the smallest, got {[tuple(t.shape) for t in xs]}")
        params = self.params(len(small), small.device)
        return [apply_params(x, params, self.ops, self.pad, self.fill, self.mode, scale=s)
                for x, s in zip(xs, scales, strict=True)]

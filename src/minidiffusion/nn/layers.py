"""Building blocks shared by the classifiers and U-Nets: conv helper, residual blocks, GroupNorm check.

All blocks take and return NCHW float tensors. Activation classes are passed as
types (e.g. `nn.SiLU`) so a block can build as many as it needs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv", "ResBlock", "group_norm", "match_memory_format"]


def match_memory_format(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Return x in the memory format (channels_last or not) of `module`'s first 4-D weight.

    A channels_last network fed an NCHW batch (what slicing and augmentation produce) silently
    falls onto slow conversion paths -- 10x slower under CPU bf16 autocast here -- so the
    networks call this on their input.
    """
    # The first conv weight whose layout is unambiguous (size-1 dims fit either format).
    w = next((p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1),
             None)
    if w is not None and x.dim() == 4 and not w.is_contiguous() \
            and w.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """Return nn.GroupNorm(groups, channels), or raise ValueError with the fix when it cannot split."""
    if groups < 1 or channels % groups:
        divisors = [g for g in range(1, min(channels, 64) + 1) if channels % g == 0]
        raise ValueError(f"can't split {channels} channels into {groups} groups for GroupNorm; "
                         f"choose norm_groups dividing every channel count (for {channels}: {divisors})")
    return nn.GroupNorm(groups, channels)


def conv(ni: int, nf: int, ks: int = 3, stride: int = 1, act: type[nn.Module] | None = nn.ReLU,
         norm: type[nn.Module] | None = nn.BatchNorm2d, bias: bool | None = None) -> nn.Sequential:
    """Return Sequential(Conv2d, norm, act): a 'same'-padded conv, then optional norm and activation."""
    if bias is None:  # a batch norm's shift makes the conv's bias redundant
        bias = norm is None or not (isinstance(norm, type) and issubclass(norm, nn.BatchNorm2d))
    layers: list[nn.Module] = [nn.Conv2d(ni, nf, ks, stride=stride, padding=ks // 2, bias=bias)]
    if norm is not None:
        layers.append(norm(nf))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Residual block of two 3x3 convs (the first one strided).

    `preact=True` puts norm + activation before each conv instead of after (He et al. 2016).
    The shortcut is identity when shapes agree, otherwise an average pool (stride) and a 1x1 conv.
    The residual branch ends in a zero-initialised scale (norm weight, or conv for pre-activation),
    so a fresh block is the identity -- the init the course found essential for deep nets.
    Returns [N, nf, H/stride, W/stride].
    """

    def __init__(self, ni: int, nf: int, stride: int = 1, act: type[nn.Module] = nn.ReLU,
                 norm: type[nn.Module] = nn.BatchNorm2d, preact: bool = False):
        super().__init__()
        self.preact = preact
        if preact:
            self.convs = nn.Sequential(norm(ni), act(), nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False),
                                       norm(nf), act(), nn.Conv2d(nf, nf, 3, padding=1))
            nn.init.zeros_(self.convs[-1].weight)
            nn.init.zeros_(self.convs[-1].bias)
        else:
            self.convs = nn.Sequential(conv(ni, nf, stride=stride, act=act, norm=norm),
                                       conv(nf, nf, act=None, norm=norm))
            last_norm = self.convs[-1][-1]
            if getattr(last_norm, "weight", None) is not None:
                nn.init.zeros_(last_norm.weight)
        self.pool = nn.AvgPool2d(stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.idconv = nn.Conv2d(ni, nf, 1) if ni != nf else nn.Identity()
        self.act = nn.Identity() if preact else act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + self.idconv(self.pool(x)))

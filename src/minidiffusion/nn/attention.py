"""Self-attention over the pixels of a feature map, as a residual block (Vaswani et al. 2017; DDPM's U-Net).

Every pixel is a token: x (B, C, H, W) -> H*W tokens of C channels -> multi-head attention -> back.
The cost grows with (H*W)^2, so U-Nets use it only at low resolution (8x8 = 64 tokens for
32x32 images). The output projection starts at zero, so a fresh block is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm

__all__ = ["SelfAttention2d"]


class SelfAttention2d(nn.Module):
    """x + proj(attention(qkv(GroupNorm(x)))) over the H*W pixels of each image.

    Give the number of heads through `head_dim` (heads = channels // head_dim) or `heads`.
    Returns: (B, C, H, W) in x's dtype and memory format; equal to x at initialisation.

    Under bf16/fp16 autocast the projections run in low precision but q, k, v are cast to float32
    for `scaled_dot_product_attention`, so QK^T, the softmax and the weighted sum are float32 (EDM
    also takes its softmax in float32). At the 64 tokens of an 8x8 map this is faster on CPU than
    bf16 attention, not slower (BENCHMARKS.md).
    """

    def __init__(self, channels: int, head_dim: int | None = 32, norm_groups: int = 8,
                 heads: int | None = None):
        super().__init__()
        heads = heads or max(1, channels // (head_dim or channels))
        if channels % heads:
            raise ValueError(f"SelfAttention2d: {channels} channels cannot be split into {heads} heads; "
                             f"choose head_dim (or heads) dividing the channel count")
        self.heads = heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)  # a 1x1 conv on the tokens
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a view if x is channels_last
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4)
        dtype = q.dtype
        with torch.autocast(x.device.type, enabled=False):
            h = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # (B, heads, HW, C/heads)
        h = self.proj(h.to(dtype).transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + h.transpose(1, 2).unflatten(2, (H, W)).to(x.dtype)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"

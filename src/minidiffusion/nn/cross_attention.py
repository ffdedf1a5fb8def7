"""Cross-attention from a feature map to a token sequence: how a text-to-image U-Net reads its prompt.

Latent diffusion (Rombach et al. 2022) conditions the U-Net on text this way: every pixel of a
feature map x (B, C, H, W) is a query; the keys and values are projections of the text encoder's
token states (B, T, D). Each pixel thus takes a weighted mix of the prompt's tokens, weighted by
how well they answer its query. Padding tokens are masked out (mask (B, T), True = real token),
so they never change the result whatever their states hold.

As in SelfAttention2d: GroupNorm first, a residual connection, the output projection zero-initialised
(a fresh block is the identity) and QK^T, the softmax and the weighted sum in float32 under autocast.
A row whose mask holds no real token attends to nothing: its update is zero and x passes unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm

__all__ = ["CrossAttention2d"]


class CrossAttention2d(nn.Module):
    """x + proj(attention(q(GroupNorm(x)), k(context), v(context))) over the H*W pixels of each image.

    x (B, C, H, W), context (B, T, context_dim), mask bool (B, T) or None (all tokens real);
    heads = channels // head_dim. Returns: (B, C, H, W) in x's dtype and memory format; equal to x at
    initialisation and for rows with no real token.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int = 32, norm_groups: int = 8):
        super().__init__()
        heads = max(1, channels // head_dim)
        if channels % heads:
            raise ValueError(f"CrossAttention2d: {channels} channels cannot be split into {heads} heads; "
                             "choose head_dim dividing the channel count")
        self.heads, self.context_dim = heads, context_dim
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
            raise ValueError(f"CrossAttention2d expects context ({B}, T, {self.context_dim}), got "
                             f"{tuple(context.shape)}; pass the text encoder's states for this batch")
        T = context.shape[1]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a view if x is channels_last
        q = self.q(tokens).unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2)  # (B, heads, HW, C/h)
        k, v = self.kv(context).unflatten(-1, (2, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4)
        keep = None
        attn_mask = None
        if mask is not None:
            if mask.shape != (B, T):
                raise ValueError(f"CrossAttention2d expects a mask ({B}, {T}) for context {tuple(context.shape)}, "
                                 f"got {tuple(mask.shape)}")
            mask = mask.bool()
            keep = mask.any(1)  # rows with at least one real token
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]  # an empty row attends to all; zeroed below
        dtype = q.dtype
        with torch.autocast(x.device.type, enabled=False):
            h = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        h = self.proj(h.to(dtype).transpose(1, 2).flatten(2))  # (B, HW, C)
        if keep is not None:
            h = h * keep[:, None, None].to(h.dtype)
        return x + h.transpose(1, 2).unflatten(2, (H, W)).to(x.dtype)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, context_dim={self.context_dim}"

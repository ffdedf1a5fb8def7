"""A stack of transformer blocks over a feature map: the middle of a "simple diffusion" U-Net.

Hoogeboom et al. 2023 ("simple diffusion", lesson 25) put most of a U-Net's compute at its lowest
resolution, as transformer blocks over the flattened feature map: (B, C, H, W) -> H*W tokens of C
channels + a learnable position embedding -> blocks -> back to (B, C, H, W). Compute then scales by
adding blocks. Each block is pre-norm attention and MLP, modulated by the noise embedding through
adaptive LayerNorm (scale, shift and a gate per branch, DiT's "adaLN-Zero": the gates start at zero,
so a fresh block is the identity and the stack starts as a no-op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransformerBlock", "TransformerMid"]


class TransformerBlock(nn.Module):
    """x + gate_a * Attn(modulate(LN(x))) then x + gate_m * MLP(modulate(LN(x))); x (B, T, C), emb (B, E).

    Returns: (B, T, C); equal to x at initialisation.
    """

    def __init__(self, channels: int, emb_dim: int, head_dim: int = 32, mlp_ratio: int = 4):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"TransformerBlock: {channels} channels do not split into heads of {head_dim}; "
                             "choose head_dim dividing the channel count")
        self.heads = channels // head_dim
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(channels, mlp_ratio * channels), nn.GELU(),
                                 nn.Linear(mlp_ratio * channels, channels))
        self.ada = nn.Linear(emb_dim, 6 * channels)  # shift, scale, gate for attention and for the MLP
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        sa, ca, ga, sm, cm, gm = self.ada(emb)[:, None].chunk(6, dim=-1)  # each (B, 1, C)
        h = self.norm1(x) * (1 + ca) + sa
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        dtype = q.dtype
        with torch.autocast(x.device.type, enabled=False):  # softmax in float32, as SelfAttention2d does
            a = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        x = x + ga * self.proj(a.to(dtype).transpose(1, 2).reshape(b, t, c))
        return x + gm * self.mlp(self.norm2(x) * (1 + cm) + sm)


class TransformerMid(nn.Module):
    """`n_blocks` TransformerBlocks over the H*W tokens of a (B, C, H, W) map (H = W = `size`), with a learnable
    position embedding. Returns: (B, C, H, W), equal to the input at initialisation."""

    def __init__(self, channels: int, size: int, n_blocks: int, emb_dim: int, head_dim: int = 32):
        super().__init__()
        self.size = size
        self.pos = nn.Parameter(torch.randn(1, size * size, channels) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(channels, emb_dim, head_dim) for _ in range(n_blocks))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        if (hh, ww) != (self.size, self.size):
            raise ValueError(f"TransformerMid was built for {self.size}x{self.size} maps (its position embedding), "
                             f"got {hh}x{ww}; train and sample at the image size the model was made for")
        x = h.flatten(2).transpose(1, 2) + self.pos  # (B, HW, C): tokens that know where they are
        for blk in self.blocks:
            x = blk(x, emb)
        x = x - self.pos  # the embedding informs the blocks; a fresh (all-identity) stack returns its input
        fmt = torch.channels_last if h.dim() == 4 and not h.is_contiguous() else torch.contiguous_format
        return x.transpose(1, 2).reshape(b, c, hh, ww).to(h.dtype).contiguous(memory_format=fmt)

"""A small text transformer: token ids and a padding mask -> one state per token and a pooled vector.

The text tower of CLIP (Radford et al. 2021) and the prompt encoder of a text-to-image U-Net, in
miniature: a token embedding plus a learned position embedding, `layers` pre-LayerNorm transformer
blocks (x + Attn(LN(x)), then x + MLP(LN(x))), and a final LayerNorm. Attention takes a key-padding
mask, so padding tokens are never attended to: the states of the real tokens are the same whatever
the padding holds and however long it is. Unlike CLIP the attention is bidirectional (no causal
mask): the U-Net's cross-attention reads every token's state, and each should see the whole prompt.

`pooled` is the state at the <end> token, CLIP's choice (with padding on the right, the position
`mask.sum(1) - 1`): that token has attended to the whole prompt. The mask must mark a prefix of
each row (<start> ... <end>, then padding), which is what `data.tokenizer.Tokenizer.encode` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number

__all__ = ["TextEncoderConfig", "TextBlock", "TextEncoder"]


@dataclass
class TextEncoderConfig:
    """Architecture of `TextEncoder`: vocabulary, context length (position embeddings), width, depth, heads."""

    vocab_size: int
    context: int = 32
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        check_number("vocab_size", self.vocab_size, lo=3, hi=10_000_000, integer=True)
        check_number("context", self.context, lo=2, hi=4096, integer=True)
        check_number("width", self.width, lo=1, hi=16384, integer=True)
        check_number("layers", self.layers, lo=0, hi=256, integer=True)
        check_number("heads", self.heads, lo=1, hi=256, integer=True)
        check_number("mlp_ratio", self.mlp_ratio, lo=1, hi=64, integer=True)
        check_number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig: width {self.width} does not split into {self.heads} heads; "
                             "choose heads dividing the width")


class TextBlock(nn.Module):
    """x + Attn(LN(x), key-padding mask) then x + MLP(LN(x)); x (B, T, D), mask bool (B, T), True = real token.

    Returns: (B, T, D). Softmax in float32 under autocast, as SelfAttention2d takes it.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        dtype = q.dtype
        with torch.autocast(x.device.type, enabled=False):
            a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None, None, :])
        x = x + self.drop(self.proj(a.to(dtype).transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TextEncoder(nn.Module):
    """Prompt encoder: (ids int64 (B, T), mask bool (B, T), T <= context) -> (states (B, T, width), pooled (B, width)).

    `pooled` is the final state at the <end> token (position mask.sum(1) - 1). Both are float32 (or the
    autocast dtype), unbounded, after the final LayerNorm.
    """

    def __init__(self, cfg: TextEncoderConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or TextEncoderConfig(**kwargs)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.tok.weight, std=0.02)

    @property
    def width(self) -> int:
        """Size of each state and of `pooled` (an int)."""
        return self.cfg.width

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        if t > self.cfg.context:
            raise ValueError(f"TextEncoder was built for {self.cfg.context} tokens, got {t}; encode prompts with "
                             "the tokenizer saved with the model (its context length)")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        mask = mask.bool()
        # a row without any real token would attend to nothing (NaN): let it see its first token instead
        attn_mask = mask.clone()
        attn_mask[:, 0] |= ~mask.any(1)
        x = self.tok(ids) + self.pos[:t]
        for blk in self.blocks:
            x = blk(x, attn_mask)
        states = self.norm(x)
        end = (mask.sum(1) - 1).clamp(min=0)
        return states, states[torch.arange(b, device=ids.device), end]

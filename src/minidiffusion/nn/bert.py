"""A BERT encoder in plain torch, to run pretrained sentence encoders (MiniLM) without `transformers`.

Devlin et al. 2019. Token + position + token-type embeddings and a LayerNorm, then `layers`
*post*-LayerNorm blocks (x = LN(x + Attn(x)), then x = LN(x + MLP(x)), GELU in the MLP: BERT's
order, unlike the pre-LN blocks of `nn/text.py`), with a key-padding mask. No dropout: the
weights are used frozen, for inference. `hf_to_ours` renames a Hugging Face `BertModel` state
dict (`encoder.layer.0.attention.self.query.weight`, ...) to this module's names; its pooler (a
next-sentence head) is not part of the encoder and is dropped.

`pooled` is the masked mean of the last states over the real tokens: sentence-transformers' pooling
for all-MiniLM-L6-v2, the vector its similarity training shaped (not normalised here; normalise it
for cosine similarity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number

__all__ = ["BertConfig", "BertLayer", "BertEncoder", "hf_to_ours"]


@dataclass
class BertConfig:
    """Architecture of `BertEncoder` (defaults: all-MiniLM-L6-v2, 6 layers of width 384 and 12 heads)."""

    vocab_size: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    def __post_init__(self):
        for name in ("vocab_size", "width", "intermediate", "max_positions"):
            check_number(name, getattr(self, name), lo=1, hi=10_000_000, integer=True)
        check_number("layers", self.layers, lo=1, hi=256, integer=True)
        check_number("heads", self.heads, lo=1, hi=256, integer=True)
        check_number("type_vocab_size", self.type_vocab_size, lo=1, hi=64, integer=True)
        check_number("eps", self.eps, lo=0.0, hi=1.0, lo_open=True)
        if self.width % self.heads:
            raise ValueError(f"BertConfig: width {self.width} does not split into {self.heads} heads")

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """Return the BertConfig of a Hugging Face BERT `config.json` (as a dict)."""
        return cls(vocab_size=config["vocab_size"], width=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"], intermediate=config["intermediate_size"],
                   max_positions=config["max_position_embeddings"], type_vocab_size=config.get("type_vocab_size", 2),
                   eps=float(config.get("layer_norm_eps", 1e-12)))


class BertLayer(nn.Module):
    """x = LN(x + Attn(x)), then x = LN(x + MLP(x)); x (B, T, D), mask bool (B, T), True = real token.

    Returns: (B, T, D). Softmax in float32 under autocast.
    """

    def __init__(self, width: int, heads: int, intermediate: int, eps: float = 1e-12):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.fc1, self.fc2 = nn.Linear(width, intermediate), nn.Linear(intermediate, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        dtype = q.dtype
        with torch.autocast(x.device.type, enabled=False):
            a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None, None, :])
        x = self.norm1(x + self.o(a.to(dtype).transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class BertEncoder(nn.Module):
    """(ids int64 (B, T), mask bool (B, T)) -> (states (B, T, width), pooled (B, width)), T <= max_positions.

    `pooled` is the mean of the states where mask is True. Both float, unbounded (after a LayerNorm).
    """

    def __init__(self, cfg: BertConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or BertConfig(**kwargs)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.max_positions, cfg.width)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.emb_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.layers = nn.ModuleList(BertLayer(cfg.width, cfg.heads, cfg.intermediate, cfg.eps)
                                    for _ in range(cfg.layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        if t > self.cfg.max_positions:
            raise ValueError(f"BertEncoder takes at most {self.cfg.max_positions} tokens, got {t}")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        attn_mask = mask.clone()
        attn_mask[:, 0] |= ~mask.any(1)  # a row with no real token sees its first one instead of nothing (NaN)
        x = self.tok(ids) + self.pos.weight[:t] + self.type_emb.weight[0]
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, attn_mask)
        w = mask.to(x.dtype)[..., None]
        return x, (x * w).sum(1) / w.sum(1).clamp(min=1)


_RENAMES = [  # Hugging Face BertModel name -> ours
    (r"^embeddings\.word_embeddings\.", "tok."),
    (r"^embeddings\.position_embeddings\.", "pos."),
    (r"^embeddings\.token_type_embeddings\.", "type_emb."),
    (r"^embeddings\.LayerNorm\.", "emb_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.o."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.norm2."),
]
_DROPPED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a Hugging Face BertModel state dict under BertEncoder's names (the pooler and position ids dropped;
    a leading "bert." is removed; names that match no rule are kept as they are, for load_state_dict to report)."""
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("bert.")
        if _DROPPED.match(name):
            continue
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, name)
            if n:
                name = new
                break
        out[name] = tensor
    return out

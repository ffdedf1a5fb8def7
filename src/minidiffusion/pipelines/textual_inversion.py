"""Learned words at inference: save and load the embedding vectors of a token learned by textual inversion.

An embedding file (`EMB.safetensors`, a few KB) holds `vectors` float32 [V, D] and, in its header, the
token ("<my-cat>"), the V token names that carry the vectors ("<my-cat>", "<my-cat-1>", ...), the
init word, and the fingerprint of the text encoder it was learned for. Loading it into a pipeline
adds the tokens and their rows to the tokenizer and the embedding table, and makes every prompt
that names the token use all V vectors; a file learned for another text encoder is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import read_safetensors
from ..errors import CheckpointError, ConfigError
from ..paths import save_safetensors

__all__ = ["FORMAT", "token_names", "learnable_encoder", "save_embedding", "load_embedding"]

FORMAT = "minidiffusion-embedding-1"


def token_names(token: str, vectors: int) -> list[str]:
    """Return the V token names of a V-vector token: the token itself, then "<tok-1>" .. "<tok-{V-1}>" (names that
    do not contain the token itself, so no name is matched inside another)."""
    if vectors < 1:
        raise ConfigError(f"vectors must be an integer >= 1, got {vectors}")
    stem, close = (token[:-1], ">") if token.endswith(">") else (token, "")
    return [token] + [f"{stem}-{i}{close}" for i in range(1, vectors)]


def learnable_encoder(pipe):
    """Return the pipeline's text encoder if it can learn new words (embedding, add_tokens, fingerprint)."""
    enc = pipe.text_encoder
    if not all(hasattr(enc, a) for a in ("embedding", "add_tokens", "fingerprint", "token_ids")):
        raise ConfigError("this pipeline's text encoder cannot learn new words (MiniLM is frozen with a fixed "
                          "vocabulary); use a text-to-image model with its own CLIP text encoder, or a Stable "
                          "Diffusion folder")
    return enc


def save_embedding(path: str | Path, vectors: torch.Tensor, token: str, tokens: list[str], init_word: str,
                   fingerprint: str) -> Path:
    """Write a learned token's vectors [V, D] and what it belongs to; return the path (atomic)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"an embedding is saved as NAME.safetensors, got {path}")
    meta = {"format": FORMAT, "kind": "embedding", "token": token, "tokens": json.dumps(tokens),
            "init_word": init_word, "encoder": fingerprint}
    return save_safetensors({"vectors": vectors.detach().float().cpu()}, path, metadata=meta)


def load_embedding(pipe, path: str | Path) -> list[str]:
    """Add an embedding file's token to `pipe` (a TextToImage); return its token names (see the module docstring)."""
    enc = learnable_encoder(pipe)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT or "vectors" not in tensors:
        raise CheckpointError(f"{path} is not an embedding written by `minidiffusion textual-inversion`")
    if meta.get("encoder") != enc.fingerprint():
        raise CheckpointError(f"{path} was learned for another text encoder; learn the token again with this model "
                              "(`minidiffusion textual-inversion RUN ...`)")
    tokens, vectors = json.loads(meta["tokens"]), tensors["vectors"]
    if len(tokens) != len(vectors) or vectors.shape[1] != enc.embedding.embedding_dim:
        raise CheckpointError(f"{path} holds {len(vectors)} vectors of size {vectors.shape[1]} for {len(tokens)} "
                              f"tokens; this encoder's vectors have size {enc.embedding.embedding_dim}")
    enc.add_tokens(tokens, vectors)
    pipe.expansions[meta["token"]] = " ".join(tokens)
    return tokens

"""Textual inversion (Gal et al. 2022): a new word learned from a few images, every weight of the model frozen.

`minidiffusion textual-inversion RUN --images DIR --token "<my-cat>" --init-word cat --out EMB.safetensors`:
the token (V vectors: "<my-cat>", "<my-cat-1>", ...) is added to the tokenizer, its rows start as
the mean of the init word's token embeddings, and only those rows train, with the frozen model's
own denoising loss on the concept images (flipped at random, their latents drawn from the VAE's
posterior each step) under prompts built from templates that name the token with all its vectors.
Gradients reach no other row and no other weight (a test compares every one bit for bit).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..config import check_number
from ..data.augment import random_flip
from ..data.folders import load_image_folder
from ..data.images import uint8_to_float
from ..data.loaders import DataLoaders, TensorLoader
from ..device import check_precision
from ..errors import ConfigError, DataError
from ..learner import Callback, Learner
from ..learner.callbacks import BatchTransformCB, MetricsCB
from ..learner.device import DeviceCB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback
from ..learner.progress import ProgressCB
from ..pipelines.textual_inversion import learnable_encoder, save_embedding, token_names

__all__ = ["TextualInversionConfig", "TEMPLATES", "concept_images", "train_textual_inversion"]

TEMPLATES = ("{}", "an emoji of {}", "a {} emoji", "a picture of {}", "{}, an emoji", "a small {}")


@dataclass
class TextualInversionConfig:
    """What to learn (token, init word, vectors) and how (steps, lr, batch)."""

    token: str = "<concept>"
    init_word: str = "emoji"
    vectors: int = 1
    steps: int = 500
    lr: float = 5e-3
    batch_size: int = 4
    flip: float = 0.5
    templates: tuple[str, ...] = field(default_factory=lambda: TEMPLATES)
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        check_number("vectors", self.vectors, lo=1, hi=16, integer=True)
        check_number("steps", self.steps, lo=1, hi=1_000_000, integer=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("batch_size", self.batch_size, lo=1, hi=1024, integer=True)
        check_number("flip", self.flip, lo=0.0, hi=1.0)
        check_number("seed", self.seed, lo=0, hi=2**63 - 1, integer=True)
        check_precision(self.precision)
        if not self.templates or not all("{}" in t for t in self.templates):
            raise ConfigError("every textual-inversion template must name the token with {}, e.g. 'an emoji of {}'")


def concept_images(folder: str | Path, size: int) -> torch.Tensor:
    """Return the concept's images as uint8 [N, 3, size, size] (a folder of 1-20 PNG/JPEG files)."""
    images, _, _ = load_image_folder(folder, size, channels=3, cache=False)
    if not 1 <= len(images) <= 100:
        raise DataError(f"{folder} holds {len(images)} images; give 3-5 (at most 100) pictures of the concept")
    return images


class _Rows(nn.Module):
    """What the Learner trains: the embedding table, of which a gradient mask lets only the new rows move."""

    def __init__(self, embedding: nn.Embedding, ids: list[int]):
        super().__init__()
        self.embedding = embedding
        mask = torch.zeros(embedding.num_embeddings, 1)
        mask[ids] = 1.0
        self.register_buffer("mask", mask, persistent=False)
        embedding.weight.requires_grad_(True)
        embedding.weight.register_hook(lambda g: g * self.mask.to(g))


class TextualInversionCB(Callback):
    """The stages: latents of the batch (posterior samples), prompts naming the token, the frozen model's loss."""

    order = 10

    def __init__(self, pipe, prompt_token: str, templates: tuple[str, ...], seed: int):
        self.pipe, self.prompt_token, self.templates = pipe, prompt_token, templates
        self.rng = random.Random(seed)

    def predict(self, learn) -> None:
        x = learn.batch[0]
        with torch.no_grad():
            latents = self.pipe.model.vae.encode_latents(x, sample=True)
        prompts = [self.rng.choice(self.templates).format(self.prompt_token) for _ in range(len(x))]
        cond = self.pipe.conditioning(prompts)
        learn.preds = None
        learn.loss = self.pipe.model.objective.loss(self.pipe.model.net, latents, **cond)

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction


def train_textual_inversion(pipe, images: torch.Tensor, out: str | Path, cfg: TextualInversionConfig,
                            progress: bool = True) -> dict:
    """Learn `cfg.token` from uint8 `images` [N, 3, S, S] on a TextToImage `pipe`; write the embedding to `out`.

    Returns {token, tokens, vectors, steps, seconds, loss_first, loss_last, embedding}. `pipe` keeps the
    learned token (prompts naming it now use it).
    """
    enc = learnable_encoder(pipe)
    fingerprint = enc.fingerprint()
    init_ids = enc.token_ids(cfg.init_word)
    if not init_ids:
        raise DataError(f"the init word {cfg.init_word!r} has no tokens; give a word, e.g. --init-word cat")
    emb = enc.embedding
    init = emb.weight.detach()[init_ids].mean(0, keepdim=True).expand(cfg.vectors, -1).clone()
    tokens = token_names(cfg.token, cfg.vectors)
    ids = enc.add_tokens(tokens, init)
    pipe.expansions[cfg.token] = " ".join(tokens)
    for module in (pipe.model.net, pipe.model.vae, enc):
        module.requires_grad_(False)
    rows = _Rows(enc.embedding, ids)
    torch.manual_seed(cfg.seed)
    reps = -(-cfg.steps * cfg.batch_size // len(images))
    x = images.repeat(reps, 1, 1, 1)[: cfg.steps * cfg.batch_size]
    dls = DataLoaders(TensorLoader(x, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                   batch_tfm=lambda b: (uint8_to_float(b[0]),)),
                      TensorLoader(images[:1], batch_size=1, batch_tfm=lambda b: (uint8_to_float(b[0]),)))
    cbs = [DeviceCB(pipe.model.device), TextualInversionCB(pipe, cfg.token, cfg.templates, cfg.seed), MetricsCB(),
           NaNGuardCB(), ProgressCB(show=progress, plot=False)]
    if cfg.flip:
        cbs.append(BatchTransformCB(partial(random_flip, p=cfg.flip)))
    _, mp = precision_callback(cfg.precision, pipe.model.device)
    cbs += [mp] if mp else []
    losses: list[float] = []

    class _Record(Callback):
        def after_batch(self, learn):
            losses.append(float(learn.loss.detach()))

    learn = Learner(rows, dls, lr=cfg.lr, cbs=[*cbs, _Record()],
                    opt_func=lambda params, lr: torch.optim.AdamW([rows.embedding.weight], lr=lr, weight_decay=0.0))
    start = time.time()
    learn.fit(1, valid=False)
    emb.weight.requires_grad_(False)
    vectors = rows.embedding.weight.detach()[ids].clone()
    save_embedding(out, vectors, cfg.token, tokens, cfg.init_word, fingerprint)
    window = max(1, len(losses) // 10)
    return {"token": cfg.token, "tokens": tokens, "vectors": cfg.vectors, "steps": len(losses),
            "seconds": round(time.time() - start, 1), "loss_first": sum(losses[:window]) / window,
            "loss_last": sum(losses[-window:]) / window, "embedding": str(out)}

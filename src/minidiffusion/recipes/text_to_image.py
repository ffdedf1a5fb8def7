"""The text-to-image recipe: latent diffusion whose U-Net attends to the caption, Stable Diffusion at small scale.

It is the diffusion recipe on encoded emoji latents (`latents=`, written by `minidiffusion encode`)
with one change: the condition is the caption instead of a label. Each epoch draws every emoji's
caption from the templates (data/captions.py); a frozen text encoder (the text tower of a CLIP
trained here, `text_encoder=RUN`, or `text_encoder=minilm`) turns the batch's captions into token
states, a mask and a pooled vector; with probability `cond_drop` a caption is replaced by the empty
prompt, so one network learns the unconditional model that classifier-free guidance needs. The
run directory is a complete pipeline folder (U-Net, VAE, text encoder, tokenizer):
`minidiffusion sample RUN --prompt "..."` and `TextToImage.from_run(RUN)` load it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import check_number
from ..data.captions import captions_for
from ..data.emoji import load_emoji
from ..data.latents import LatentLoader, read_latents
from ..data.loaders import DataLoaders
from ..device import resolve_device
from ..errors import ConfigError
from ..learner import Callback
from ..learner.callbacks import MetricsCB
from ..learner.ema import EMACB
from ..learner.precision import precision_of
from ..learner.time_budget import TimeBudgetCB
from ..nn.unet import UNet
from ..pipelines.image import save_model
from ..pipelines.text import load_text_encoder, save_text_encoder
from ..runs import MODEL, SAMPLES
from .callbacks import DiffusionCB
from .common import fit_epochs, is_main, start_run
from .diffusion import DiffusionConfig, copy_autoencoder, diffusion_learner

__all__ = ["TextToImageConfig", "TextConditionCB", "train_text_to_image", "SAMPLE_PROMPTS"]

SAMPLE_PROMPTS = ("red apple", "a smiling face", "flag: Japan", "an emoji of a cat", "a car", "a heart",
                  "a tree", "a police officer")


@dataclass
class TextToImageConfig(DiffusionConfig):
    """A text-to-image run: the diffusion config (on latents) plus the frozen text encoder."""

    recipe: ClassVar[str] = "text_to_image"

    text_encoder: str = "runs/emoji-clip"  # a `train emoji-clip` run (its text tower) or "minilm"

    def __post_init__(self):
        super().__post_init__()
        if not self.latents:
            raise ConfigError("text-to-image trains on encoded latents: pass latents=DIR (from `minidiffusion encode "
                              "VAE --data emoji --out DIR`)")
        if self.fid_every:
            raise ConfigError("fid_every is for label-conditional models; score a text-to-image run with "
                              "benchmarks/text_to_image.py")
        check_number("cond_drop", self.cond_drop, lo=0.0, hi=1.0, hi_open=True)


class TextConditionCB(Callback):
    """Turn each batch's item indices into the U-Net's text inputs: this epoch's captions through the encoder.

    `condition(learn)` (DiffusionCB calls it) returns {context, context_mask, pooled} for the batch,
    with each caption replaced by the empty prompt with probability `drop` in training (global RNG,
    so `--resume` stays exact).
    """

    order = 5

    def __init__(self, encoder, train_set, valid_set, drop: float, seed: int):
        self.encoder, self.sets, self.drop, self.seed = encoder, (train_set, valid_set), drop, seed
        self.empty = encoder.encode([""])

    def before_epoch(self, learn) -> None:
        items = self.sets[0] if learn.training else self.sets[1]
        self.ids, self.mask = self.encoder.encode(captions_for(items, learn.epoch if learn.training else 0, self.seed))

    def condition(self, learn) -> dict:
        idx = learn.batch[1].cpu()
        ids, mask = self.ids[idx].clone(), self.mask[idx].clone()
        if learn.training and self.drop:
            drop = torch.rand(len(idx)) < self.drop
            ids[drop], mask[drop] = self.empty[0][0], self.empty[1][0]
        device = learn.batch[0].device
        self.encoder.to(device)
        states, pooled = self.encoder(ids.to(device), mask.to(device))
        return {"context": states, "context_mask": mask.to(device), "pooled": pooled}


def _loaders(cfg: TextToImageConfig, vae_sha: str) -> tuple[DataLoaders, int, int]:
    """Train/valid LatentLoaders over the train and test latents; the 'labels' are item indices (for captions)."""
    sets = [read_latents(cfg.latents, vae_sha256=vae_sha, split=s) for s in ("train", "test")]
    loaders = []
    for i, s in enumerate(sets):
        moments = torch.from_numpy(np.array(s.moments))
        idx = torch.arange(len(moments))
        loaders.append(LatentLoader(moments, idx, s.scale_factor, sample=i == 0, batch_size=cfg.batch_size,
                                    shuffle=i == 0, seed=cfg.seed))
    c, h, _ = sets[0].latent_shape
    return DataLoaders(*loaders), c, h


def train_text_to_image(cfg: TextToImageConfig, out: str | Path, resume: bool = False, progress: bool = True,
                        replace: bool = False) -> dict:
    """Train the emoji text-to-image model into run directory `out` (a pipeline folder); return a summary.

    Writes config.toml, metrics.jsonl, loss.png, checkpoints/, model.*, vae.*, text_encoder.* +
    tokenizer.json (or the MiniLM marker) and samples.png (a grid of SAMPLE_PROMPTS x 4 seeds).
    """
    from ..pipelines.autoencoder import weights_sha256
    from ..pipelines.text_to_image import TextToImage

    device = resolve_device(cfg.device)
    vae = cfg.vae or read_latents(cfg.latents).meta.get("vae", "")
    if not vae:
        raise ConfigError(f"the latents in {cfg.latents} do not name their autoencoder; pass vae=PATH")
    dls, channels, size = _loaders(cfg, weights_sha256(vae))
    encoder = load_text_encoder(cfg.text_encoder, device)
    train, test = load_emoji("train"), load_emoji("test")
    if len(train) != len(dls.train.tensors[0]) or len(test) != len(dls.valid.tensors[0]):
        raise ConfigError(f"the latents in {cfg.latents} do not hold the emoji train/test splits of this "
                          "installation; encode them again with `minidiffusion encode VAE --data emoji`")
    model = dataclasses.replace(cfg.model, in_channels=channels, out_channels=channels, n_classes=0,
                                context_dim=encoder.width, pooled_dim=encoder.width)
    cfg = dataclasses.replace(cfg, model=model, image_size=size, data="emoji", vae=str(vae), conditional=True)
    out = start_run(out, cfg, resume=resume, replace=replace)
    torch.manual_seed(cfg.seed)
    net = UNet(cfg.model)
    text = TextConditionCB(encoder, train, test, cfg.cond_drop, cfg.seed)
    learn = diffusion_learner(cfg, net, dls, device, out=out, progress=progress)
    diffusion = learn.cb(DiffusionCB)
    diffusion.n_classes, diffusion.condition = 0, text.condition
    learn.cbs.append(text)
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    seconds = time.time() - start
    save_model(learn.cb(EMACB).ema_model, cfg, None, out / MODEL)
    copy_autoencoder(cfg.vae, out)
    save_text_encoder(encoder, out)
    pipe = TextToImage.from_run(out, device)
    rows = [pipe(p, n=4, seed=cfg.seed) for p in SAMPLE_PROMPTS]
    from ..data.images import save_labelled_grid

    grid = save_labelled_grid(torch.cat(rows), list(SAMPLE_PROMPTS), out / SAMPLES)
    metrics, budget = learn.cb(MetricsCB), learn.cb(TimeBudgetCB)
    return {"train_loss": (metrics.latest("train") or {}).get("loss"),
            "valid_loss": (metrics.latest("valid") or {}).get("loss"), "steps": learn.step,
            "seconds": round(seconds, 1), "train_seconds": round(budget.seconds, 1) if budget else None,
            "params": sum(p.numel() for p in net.parameters()), "precision": precision_of(learn),
            "text_encoder": cfg.text_encoder, "device": str(device), "run_dir": str(out), "samples": str(grid)}

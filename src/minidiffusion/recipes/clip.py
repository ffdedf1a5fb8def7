"""The CLIP recipe (lesson 9's text encoder): image and text towers trained so matching pairs score high.

`train_clip(cfg, out)` (preset `emoji-clip`): trains a byte-level BPE tokenizer on the training
emoji's captions (all templates), then the two towers with the symmetric contrastive loss over
each batch's similarity matrix, the captions drawn from the templates anew each epoch. Held-out
emoji are never seen. It reports on the 368 held-out emoji: text -> image and image -> text
retrieval (top-1 / top-5 among all of them, chance beside) and zero-shot group classification.
The run directory holds model.safetensors + model.toml (kind "clip") and tokenizer.json; its text
tower is the text encoder of the emoji text-to-image models.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import save_component
from ..config import check_number, to_dict
from ..data.augment import random_flip
from ..data.captions import TEMPLATES, all_captions, caption, caption_parts, captions_for
from ..data.emoji import load_emoji
from ..data.images import uint8_to_float
from ..data.loaders import uint8_loaders
from ..data.tokenizer import TokenizerConfig, train_tokenizer
from ..device import check_precision, resolve_device
from ..learner import Callback, Learner
from ..learner.callbacks import BatchTransformCB, MetricsCB
from ..learner.checkpoint import CheckpointCB
from ..learner.device import DeviceCB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback, precision_of
from ..learner.progress import ProgressCB
from ..learner.schedules import OneCycleCB
from ..learner.time_budget import TimeBudgetCB
from ..metrics.clip_score import retrieval, zero_shot_accuracy
from ..nn.clip import CLIP, CLIPConfig, clip_loss
from ..nn.text import TextEncoderConfig
from ..paths import float32_state
from ..pipelines.text import TOKENIZER
from ..runs import MODEL
from .common import fit_epochs, is_main, on_main, start_run, training_cbs

__all__ = ["CLIPTrainConfig", "CLIPCB", "train_clip", "group_prompt"]


def _default_clip() -> CLIPConfig:
    return CLIPConfig(text=TextEncoderConfig(vocab_size=2048, context=32, width=256, layers=4, heads=4))


def group_prompt(group_words: str) -> str:
    """Return the zero-shot prompt of an emoji group ("food and drink" -> "a food and drink emoji")."""
    return f"a {group_words} emoji"


@dataclass
class CLIPTrainConfig:
    """A CLIP run on the emoji: towers, tokenizer, optimisation."""

    recipe: ClassVar[str] = "clip"

    model: CLIPConfig = field(default_factory=_default_clip)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: str = "emoji"
    image_size: int = 64
    epochs: int = 30
    minutes: float = 0.0
    batch_size: int = 128  # contrastive: each image against the batch's captions
    lr: float = 1e-3
    weight_decay: float = 0.1
    flip: float = 0.5
    precision: str = "auto"
    seed: int = 0
    sync_bn: bool = True  # under torchrun: the image tower's batch norms use the global batch's statistics
    device: str = "auto"

    def __post_init__(self):
        if self.data != "emoji":
            from ..errors import ConfigError

            raise ConfigError(f"the clip recipe trains on captioned emoji: data must be emoji, got {self.data!r}")
        check_number("image_size", self.image_size, lo=8, hi=512, integer=True)
        check_number("epochs", self.epochs, lo=1, hi=100_000, integer=True)
        check_number("minutes", self.minutes, lo=0.0, hi=100_000.0)
        check_number("batch_size", self.batch_size, lo=2, hi=65_536, integer=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("weight_decay", self.weight_decay, lo=0.0, hi=10.0)
        check_number("flip", self.flip, lo=0.0, hi=1.0)
        check_number("seed", self.seed, lo=0, hi=2**63 - 1, integer=True)
        check_precision(self.precision)


class CLIPCB(Callback):
    """The CLIP stages: captions of this epoch -> tokens; loss = clip_loss(model(images, ids, mask)).

    Training captions are drawn from the templates per (seed, epoch); validation uses the same draw
    every epoch, so validation losses are comparable.
    """

    order = 10

    def __init__(self, train_set, valid_set, tokenizer, seed: int):
        self.sets, self.tokenizer, self.seed = (train_set, valid_set), tokenizer, seed

    def before_epoch(self, learn) -> None:
        items = self.sets[0] if learn.training else self.sets[1]
        self.ids, self.mask = self.tokenizer.encode(captions_for(items, learn.epoch if learn.training else 0,
                                                                 self.seed))

    def predict(self, learn) -> None:
        x, idx = learn.batch
        idx = idx.cpu()
        device = x.device
        learn.preds = learn.model(x, self.ids[idx].to(device), self.mask[idx].to(device))
        learn.loss = clip_loss(learn.preds)

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction


def train_clip(cfg: CLIPTrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
               replace: bool = False) -> dict:
    """Train the emoji CLIP into run directory `out`; return a summary with held-out retrieval and zero-shot.

    Writes config.toml, metrics.jsonl, loss.png, checkpoints/, tokenizer.json and model.safetensors +
    model.toml.
    """
    device = resolve_device(cfg.device)
    train, test = (load_emoji(s, image_size=cfg.image_size) for s in ("train", "test"))
    tokenizer = train_tokenizer(all_captions(train, TEMPLATES), cfg.tokenizer)
    text = dataclasses.replace(cfg.model.text, vocab_size=tokenizer.vocab_size, context=tokenizer.context)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text))
    out = start_run(out, cfg, resume=resume, replace=replace)
    on_main(tokenizer.save, out / TOKENIZER)
    torch.manual_seed(cfg.seed)
    model = CLIP(cfg.model)
    dls = uint8_loaders((train.images, torch.arange(len(train))), (test.images, torch.arange(len(test))),
                        cfg.batch_size, seed=cfg.seed)
    dls.train.drop_last = True  # a contrastive batch of 1 has nothing to contrast
    cbs = [DeviceCB(device), CLIPCB(train, test, tokenizer, cfg.seed), MetricsCB(), NaNGuardCB(),
           ProgressCB(show=progress), TimeBudgetCB(cfg.minutes, cfg.lr) if cfg.minutes > 0 else OneCycleCB(cfg.lr),
           *training_cbs(cfg.seed, cfg.sync_bn)]
    if cfg.flip:
        cbs.append(BatchTransformCB(partial(random_flip, p=cfg.flip)))
    _, mp = precision_callback(cfg.precision, device)
    cbs += [mp] if mp else []
    cbs.append(CheckpointCB(config=to_dict(cfg)))
    opt = partial(torch.optim.AdamW, eps=1e-5, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    learn = Learner(model, dls, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    model = learn.model.eval()
    save_component(out / MODEL, float32_state(model), cfg.model, "clip")
    x = uint8_to_float(test.images)
    names = [caption(caption_parts(n, g, s)) for n, g, s in zip(test.names, test.groups, test.subgroups, strict=True)]
    found = retrieval(model, tokenizer, x, names)
    prompts = [group_prompt(caption_parts("", g, "").group) for g in test.group_names]
    zero_shot = zero_shot_accuracy(model, tokenizer, x, test.labels("group"), prompts)
    metrics = learn.cb(MetricsCB)
    return {"train_loss": (metrics.latest("train") or {}).get("loss"), "valid_loss": (metrics.latest("valid") or {})
            .get("loss"), "steps": learn.step, "seconds": round(time.time() - start, 1),
            "params": sum(p.numel() for p in model.parameters()), "precision": precision_of(learn),
            "vocab_size": tokenizer.vocab_size, **found, "zero_shot_group": zero_shot,
            "zero_shot_chance": 1 / len(prompts), "run_dir": str(out)}

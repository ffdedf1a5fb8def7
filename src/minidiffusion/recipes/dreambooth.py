"""DreamBooth (Ruiz et al. 2023): fine-tune the U-Net so a rare token means one subject, with prior preservation.

`minidiffusion dreambooth RUN --images DIR --token sks --class-word dog --out DIR`: the model first
draws `class_images` images of "a dog" itself (the prior); then the U-Net trains on the subject's
images under "a sks dog" plus, weighted by `prior_weight`, on its own class images under "a dog",
so that "dog" keeps meaning dogs (without the prior term, every dog drifts towards the subject).
The text encoder and the VAE stay frozen. The output is a full pipeline folder (the run's VAE,
text encoder and tokenizer, the fine-tuned U-Net) that loads like any other.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_number
from ..data.augment import random_flip
from ..data.images import uint8_to_float
from ..data.loaders import DataLoaders, TensorLoader
from ..device import check_precision
from ..errors import ConfigError
from ..learner import Callback, Learner
from ..learner.callbacks import MetricsCB
from ..learner.device import DeviceCB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback
from ..learner.progress import ProgressCB
from ..paths import check_writable
from ..pipelines.image import save_model

__all__ = ["DreamBoothConfig", "dreambooth_loss", "class_images", "train_dreambooth"]


@dataclass
class DreamBoothConfig:
    """The subject's token and class word, the prior, and the fine-tuning."""

    token: str = "sks"
    class_word: str = "emoji"
    steps: int = 300
    lr: float = 2e-4
    batch_size: int = 4  # subject images per step (and as many class images)
    prior_weight: float = 1.0  # 0: no prior preservation
    class_images: int = 100
    class_steps: int = 20  # sampling steps for the class images
    flip: float = 0.5
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if not self.token.strip() or not self.class_word.strip():
            raise ConfigError("give a token (e.g. sks) and a class word (e.g. dog) for DreamBooth")
        check_number("steps", self.steps, lo=1, hi=1_000_000, integer=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("batch_size", self.batch_size, lo=1, hi=1024, integer=True)
        check_number("prior_weight", self.prior_weight, lo=0.0, hi=1000.0)
        check_number("class_images", self.class_images, lo=0 if not self.prior_weight else 1, hi=100_000,
                     integer=True)
        check_number("class_steps", self.class_steps, lo=1, hi=1000, integer=True)
        check_number("flip", self.flip, lo=0.0, hi=1.0)
        check_number("seed", self.seed, lo=0, hi=2**63 - 1, integer=True)
        check_precision(self.precision)

    @property
    def subject_prompt(self) -> str:
        """ "a sks dog": what the subject's images are trained under."""
        return f"a {self.token} {self.class_word}"

    @property
    def class_prompt(self) -> str:
        """ "a dog": what the prior's images are drawn and trained under."""
        return f"a {self.class_word}"


def dreambooth_loss(objective, net, subject: torch.Tensor, subject_cond: dict, prior: torch.Tensor | None,
                    prior_cond: dict | None, prior_weight: float) -> tuple[torch.Tensor, dict]:
    """Return (loss, {subject, prior}): the objective's loss on the subject's latents plus prior_weight times its
    loss on the class latents (Ruiz et al. 2023, eq. 2). Without class latents or weight, the subject's loss."""
    subject_loss = objective.loss(net, subject, **subject_cond)
    if prior is None or not prior_weight:
        return subject_loss, {"subject": subject_loss}
    prior_loss = objective.loss(net, prior, **prior_cond)
    return subject_loss + prior_weight * prior_loss, {"subject": subject_loss, "prior": prior_loss}


@torch.no_grad()
def class_images(pipe, cfg: DreamBoothConfig) -> torch.Tensor:
    """Return the prior: `cfg.class_images` images [N, 3, H, W] in [-1, 1] the model draws for the class prompt."""
    out = [pipe(cfg.class_prompt, n=min(16, cfg.class_images - i), seed=cfg.seed + 10_000 + i, steps=cfg.class_steps)
           for i in range(0, cfg.class_images, 16)]
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1)


class DreamBoothCB(Callback):
    """The stages: the batch's subject latents (and as many class latents) through `dreambooth_loss`."""

    order = 10

    def __init__(self, pipe, prior: torch.Tensor, cfg: DreamBoothConfig):
        self.pipe, self.prior, self.cfg = pipe, prior, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def before_fit(self, learn) -> None:
        with torch.no_grad():
            self.subject_cond = self.pipe.conditioning([self.cfg.subject_prompt])
            self.prior_cond = self.pipe.conditioning([self.cfg.class_prompt])

    def predict(self, learn) -> None:
        x = learn.batch[0]
        vae, b = self.pipe.model.vae, len(x)
        with torch.no_grad():
            subject = vae.encode_latents(x, sample=True)
            prior = None
            if len(self.prior) and self.cfg.prior_weight:
                pick = torch.randint(0, len(self.prior), (b,), generator=self.gen)
                prior = vae.encode_latents(self.prior[pick].to(x.device), sample=True)
        expand = lambda c: {k: v.expand(b, *v.shape[1:]) for k, v in c.items()}  # noqa: E731
        learn.loss, learn.loss_parts = dreambooth_loss(self.pipe.model.objective, learn.model, subject,
                                                       expand(self.subject_cond), prior, expand(self.prior_cond),
                                                       self.cfg.prior_weight)
        learn.preds = None

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction


def train_dreambooth(pipe, run_dir: str | Path, images: torch.Tensor, out: str | Path, cfg: DreamBoothConfig,
                     progress: bool = True) -> dict:
    """Fine-tune `pipe` (loaded from `run_dir`) on uint8 subject `images` [N, 3, S, S]; write the pipeline to `out`.

    Returns {steps, seconds, loss_first, loss_last, class_images, out}. `pipe` ends fine-tuned.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already holds files; give an empty or new --out folder for the fine-tuned model")
    check_writable(out / "model.safetensors")
    start = time.time()
    torch.manual_seed(cfg.seed)
    prior = class_images(pipe, cfg) if cfg.prior_weight else torch.zeros(0, 3, 1, 1)
    for module in (pipe.model.vae, pipe.text_encoder):
        module.requires_grad_(False)
    net = pipe.model.net
    net.requires_grad_(True).train()
    reps = -(-cfg.steps * cfg.batch_size // len(images))
    x = images.repeat(reps, 1, 1, 1)[: cfg.steps * cfg.batch_size]

    def to_float(b):
        return (random_flip(uint8_to_float(b[0]), cfg.flip) if cfg.flip else uint8_to_float(b[0]),)

    dls = DataLoaders(TensorLoader(x, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, batch_tfm=to_float),
                      TensorLoader(images[:1], batch_size=1, batch_tfm=to_float))
    losses: list[float] = []

    class _Record(Callback):
        def after_batch(self, learn):
            losses.append(float(learn.loss.detach()))

    cbs = [DeviceCB(pipe.model.device), DreamBoothCB(pipe, prior, cfg), MetricsCB(), NaNGuardCB(),
           ProgressCB(show=progress, plot=False), _Record()]
    _, mp = precision_callback(cfg.precision, pipe.model.device)
    cbs += [mp] if mp else []
    opt = lambda params, lr: torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=1e-2)  # noqa: E731
    Learner(net, dls, lr=cfg.lr, cbs=cbs, opt_func=opt).fit(1, valid=False)
    net.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    for f in run_dir.iterdir():  # the pipeline's other components, unchanged
        if f.is_file() and not f.name.startswith(("model.", "config.toml", "metrics.jsonl")) and f.suffix != ".png":
            shutil.copy2(f, out / f.name)
        elif f.is_dir() and f.name == "vae":
            shutil.copytree(f, out / "vae", dirs_exist_ok=True)
    save_model(net, pipe.model.cfg, pipe.model.class_names, out / "model.safetensors")
    window = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": round(time.time() - start, 1), "class_images": len(prior),
            "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
            "subject_prompt": cfg.subject_prompt, "class_prompt": cfg.class_prompt, "out": str(out)}

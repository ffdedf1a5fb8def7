"""The Fashion-MNIST classifier recipe: build, train, evaluate, and predict with TTA or MC-dropout.

The recipe (preset `fmnist-classifier`): a small ResNet whose stem starts from the training
patches' principal components (stem_init="pca"), AdamW (eps=1e-5) with a one-cycle
schedule, label smoothing, batch augmentation (pad+crop, flip, optional random erasing) on
the training device, bf16 autocast where it is fast (CUDA, or CPUs with AVX512-bf16), and
flip-averaging test-time augmentation for the reported accuracy. Inputs are the canonical
1x32x32 images in [-1, 1]. The FID/KID feature net is the penultimate layer of the v2 model
shipped in assets/ (trained with that recipe's own config), not of whatever the preset trains now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import save_config, to_dict
from .data.augment import BatchAugment
from .data.fashion_mnist import fashion_mnist_loaders, load_fashion_mnist
from .data.images import uint8_to_float
from .learner import Learner
from .learner.callbacks import BatchTransformCB, DeviceCB, MetricsCB, resolve_device
from .learner.checkpoint import CheckpointCB
from .learner.nan_guard import NaNGuardCB
from .learner.precision import check_precision, precision_callback
from .learner.progress import ProgressCB
from .learner.schedules import OneCycleCB
from .nn.init import pca_init_
from .nn.resnet import ResNet, ResNetConfig
from .paths import float32_state, save_safetensors
from .runs import prepare_run_dir

__all__ = ["ClassifierConfig", "build_classifier", "classifier_learner", "train_classifier", "predict_probs",
           "predict_tta", "predict_mc_dropout", "evaluate_accuracy"]


PCA_IMAGES = 2048  # training images whose patches set the stem's filters when stem_init = "pca"

OPTIMIZERS = {
    "adamw": partial(torch.optim.AdamW, eps=1e-5),
    "sgd": partial(torch.optim.SGD, momentum=0.9, nesterov=True),
}


@dataclass
class ClassifierConfig:
    """Everything that defines a classifier run; saved as config.toml in the run directory."""

    model: ResNetConfig = field(default_factory=ResNetConfig)
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-2  # one-cycle peak learning rate
    anneal: str = "cos"  # one-cycle's shape (warm-up and decay): cos | linear
    pct_start: float = 0.25  # fraction of the steps spent warming up to `lr`; the rest anneals
    weight_decay: float = 0.01  # decoupled for AdamW; an L2 term for SGD (there ~5e-4 is usual)
    adam_beta2: float = 0.999  # AdamW's second-moment decay (fastai uses 0.99); SGD has none
    decay_norm_bias: bool = True  # False: no weight decay on 1-D parameters (norm scales/shifts, biases)
    optimizer: str = "adamw"  # adamw (eps 1e-5) | sgd (Nesterov; momentum cycled by one-cycle)
    label_smoothing: float = 0.1
    pad: int = 1  # random-crop jitter in pixels
    flip: float = 0.5  # horizontal flip probability
    alternate_flip: bool = False  # replaces `flip`: each image mirrored in every other epoch (half first)
    erase: float = 0.0  # random-erasing probability (helps long runs, hurts 5-epoch ones)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto = bf16 on CUDA or AVX512-bf16 CPUs, else fp32
    channels_last: bool = True
    stem_init: str = "kaiming"  # kaiming | pca: the stem's filters = principal components of training patches
    tta: bool = True  # report flip-averaged test accuracy
    seed: int = 0
    data: str = ""  # folder with the Fashion-MNIST .gz files; "" searches the usual places
    train_limit: int = 0  # train on the first N images only (0 = all 60,000): quick tries and tests
    device: str = "auto"  # auto | cpu | cuda | mps

    def __post_init__(self):
        check_precision(self.precision)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.stem_init not in ("kaiming", "pca"):
            raise ValueError(f"stem_init must be 'kaiming' or 'pca', got {self.stem_init!r}")
        if self.anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be 'cos' or 'linear', got {self.anneal!r}")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start}")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError(f"adam_beta2 must be in (0, 1), got {self.adam_beta2}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def build_classifier(cfg: ClassifierConfig | None = None) -> ResNet:
    """Return a freshly initialised ResNet for `cfg.model` (seeded with cfg.seed)."""
    cfg = cfg or ClassifierConfig()
    torch.manual_seed(cfg.seed)
    return ResNet(cfg.model)


def classifier_learner(cfg: ClassifierConfig, out: str | Path | None = None, progress: bool = True) -> Learner:
    """Return a Learner wired with the recipe's callbacks (device, precision, one-cycle, metrics, ...)."""
    device = resolve_device(cfg.device)
    model = build_classifier(cfg)
    dls = fashion_mnist_loaders(cfg.batch_size, path=cfg.data or None, seed=cfg.seed, valid_batch_size=1000,
                                train_limit=cfg.train_limit or None, alternate_flip=cfg.alternate_flip)
    if cfg.stem_init == "pca":
        pca_init_(model.stem, uint8_to_float(dls.train.tensors[0][:PCA_IMAGES]))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    aug = BatchAugment(pad=cfg.pad, flip=0.0 if cfg.alternate_flip else cfg.flip, erase=cfg.erase)
    precision, mp = precision_callback(cfg.precision, device)
    sched = OneCycleCB(cfg.lr, pct_start=cfg.pct_start, anneal_strategy=cfg.anneal)
    cbs = [DeviceCB(device), BatchTransformCB(lambda x: aug(x).contiguous(memory_format=fmt)),
           MetricsCB(accuracy=True), sched, NaNGuardCB()]
    cbs += [mp] if mp else []
    cbs.append(ProgressCB(show=progress))  # the loss-curve PNG is written either way
    if out is not None:
        cbs.append(CheckpointCB(config=to_dict(cfg)))
    loss = partial(_smoothed_ce, label_smoothing=cfg.label_smoothing)
    opt_cls = OPTIMIZERS[cfg.optimizer]
    if cfg.optimizer == "adamw":
        opt_cls = partial(opt_cls, betas=(0.9, cfg.adam_beta2))  # one-cycle cycles the first beta
    opt = partial(_optimizer, opt_cls, weight_decay=cfg.weight_decay,
                  decay_norm_bias=cfg.decay_norm_bias)
    learn = Learner(model, dls, loss, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)
    learn.precision = precision
    return learn


def _optimizer(opt_cls, params, lr: float, weight_decay: float, decay_norm_bias: bool) -> torch.optim.Optimizer:
    """Return `opt_cls` over `params`; without `decay_norm_bias`, 1-D tensors get no weight decay."""
    params = list(params)
    if decay_norm_bias:
        return opt_cls(params, lr=lr, weight_decay=weight_decay)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return opt_cls(groups, lr=lr)


def _smoothed_ce(preds: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(preds.float(), targets, label_smoothing=label_smoothing)


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 1000,
                  autocast: torch.dtype | None = None) -> torch.Tensor:
    """Return class probabilities [N, C] (float32) for images [N, C, H, W] in [-1, 1], in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        xb = images[i: i + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out.append(model(xb).float().softmax(dim=1).cpu())
    return torch.cat(out)


def predict_tta(model: nn.Module, images: torch.Tensor, batch_size: int = 1000,
                autocast: torch.dtype | None = None) -> torch.Tensor:
    """Return flip-averaged class probabilities [N, C]: the mean over the image and its mirror."""
    return (predict_probs(model, images, batch_size, autocast)
            + predict_probs(model, images.flip(-1), batch_size, autocast)) / 2


@torch.no_grad()
def predict_mc_dropout(model: nn.Module, images: torch.Tensor, n: int = 20,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean, std) of class probabilities [N, C] over `n` passes with dropout kept on.

    Only Dropout layers are switched to training mode (BatchNorm keeps its running statistics),
    so the spread measures the model's uncertainty, not batch noise.
    """
    model.eval()
    drops = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    if not drops:
        raise ValueError("predict_mc_dropout needs a model with Dropout layers")
    for m in drops:
        m.train()
    try:
        runs = []
        for _ in range(n):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            runs.append(model(images).float().softmax(dim=1))
        probs = torch.stack(runs)
    finally:
        model.eval()
    return probs.mean(0), probs.std(0)


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, tta: bool = False,
                      autocast: torch.dtype | None = None) -> float:
    """Return the fraction (0..1) of `images` ([N, C, H, W] in [-1, 1]) classified as `labels` [N]."""
    probs = (predict_tta if tta else predict_probs)(model, images, autocast=autocast)
    return (probs.argmax(dim=1) == labels.cpu()).float().mean().item()


def train_classifier(cfg: ClassifierConfig, out: str | Path, resume: bool = False,
                     progress: bool = True, replace: bool = False) -> dict:
    """Train the classifier into run directory `out`; return a summary dict.

    The summary holds test_accuracy (flip-TTA when cfg.tta), test_accuracy_plain, epochs,
    seconds (wall clock of training + evaluation), params, precision and device. The run
    directory receives config.toml, metrics.jsonl, loss.png, checkpoints/ and model.safetensors.
    """
    out = prepare_run_dir(out, resume=resume, replace=replace, config=cfg)
    save_config(cfg, out / "config.toml")
    start = time.time()
    learn = classifier_learner(cfg, out, progress=progress)
    learn.fit(cfg.epochs, resume=resume)
    model = learn.model
    x_test, y_test = load_fashion_mnist("test", path=cfg.data or None)
    x_test = uint8_to_float(x_test)
    ac = torch.bfloat16 if learn.precision == "bf16" else None
    acc_plain = evaluate_accuracy(model, x_test, y_test, tta=False, autocast=ac)
    acc_tta = evaluate_accuracy(model, x_test, y_test, tta=True, autocast=ac)
    seconds = time.time() - start
    save_safetensors(float32_state(model), out / "model.safetensors")
    return {
        "test_accuracy": acc_tta if cfg.tta else acc_plain,
        "test_accuracy_plain": acc_plain,
        "test_accuracy_tta": acc_tta,
        "epochs": cfg.epochs,
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "precision": learn.precision,
        "device": str(next(model.parameters()).device),
        "run_dir": str(out),
    }

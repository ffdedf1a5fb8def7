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

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import save_component
from ..config import check_choice, check_number, to_dict
from ..data.augment import BatchAugment
from ..data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from ..data.fashion_mnist import fashion_mnist_loaders, load_fashion_mnist
from ..data.images import uint8_to_float
from ..data.loaders import DataLoaders, TensorLoader, uint8_loaders
from ..data.trivial_augment import TrivialAugment
from ..device import check_precision, resolve_device
from ..errors import ConfigError
from ..learner import Learner
from ..learner.callbacks import BatchTransformCB, MetricsCB
from ..learner.checkpoint import CheckpointCB
from ..learner.device import DeviceCB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback, precision_of
from ..learner.progress import ProgressCB
from ..learner.schedules import OneCycleCB
from ..learner.time_budget import TimeBudgetCB
from ..nn.init import pca_init_
from ..nn.resnet import ResNet, ResNetConfig
from ..paths import float32_state
from ..runs import MODEL
from .common import fit_epochs, is_main, start_run, training_cbs

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

    recipe: ClassVar[str] = "classifier"
    # options that did not beat the preset, removed (config.py): name -> (the value meaning "off", last commit)
    removed: ClassVar[dict] = {"alternate_flip": (False, "f91f512")}

    model: ResNetConfig = field(default_factory=ResNetConfig)
    epochs: int = 5
    minutes: float = 0.0  # > 0: train for this wall-clock budget (one-cycle over time) instead of epochs
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
    erase: float = 0.0  # random-erasing probability (helps long runs, hurts 5-epoch ones)
    trivial_augment: bool = False  # first one random op of random strength per image (data/trivial_augment.py)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto = bf16 on CUDA or AVX512-bf16 CPUs, else fp32
    channels_last: bool = True
    stem_init: str = "kaiming"  # kaiming | pca: the stem's filters = principal components of training patches
    tta: bool = True  # report flip-averaged test accuracy
    seed: int = 0
    sync_bn: bool = True  # under torchrun: batch norms use the global batch's statistics (as one process)
    data: str = ""  # "" or "fashion-mnist" (searched), a folder with its .gz files, "emoji" (64x64 colour),
    #                 or "instruments" (1x128x128 spectrograms, 10 families), "sprites" (64x64 colour, 20 classes),
    #                 or a Tiny ImageNet folder (holding wnids.txt, or named tiny-imagenet*)
    latents: str = ""  # a folder written by `minidiffusion encode` (train/ and test/): classify the latents instead
    label: str = "subgroup"  # emoji only: group (9 classes) | subgroup (99)
    image_size: int = 64  # emoji, sprites, Tiny ImageNet: decoded size (Fashion-MNIST is always 32, instruments 128)
    train_limit: int = 0  # train on the first N images only (0 = all 60,000): quick tries and tests
    device: str = "auto"  # auto | cpu | cuda | mps

    def __post_init__(self):
        check_precision(self.precision)
        check_choice("optimizer", self.optimizer, sorted(OPTIMIZERS))
        check_choice("stem_init", self.stem_init, ("kaiming", "pca"))
        check_choice("anneal", self.anneal, ("cos", "linear"))
        check_number("epochs", self.epochs, lo=1, hi=100_000, integer=True)
        check_number("minutes", self.minutes, lo=0.0, hi=100_000.0)
        check_number("batch_size", self.batch_size, lo=1, hi=65_536, integer=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("pct_start", self.pct_start, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_number("weight_decay", self.weight_decay, lo=0.0, hi=10.0)
        check_number("adam_beta2", self.adam_beta2, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_number("label_smoothing", self.label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        check_number("pad", self.pad, lo=0, hi=16, integer=True)
        check_number("flip", self.flip, lo=0.0, hi=1.0)
        check_number("erase", self.erase, lo=0.0, hi=1.0)
        check_number("seed", self.seed, lo=0, hi=2**63 - 1, integer=True)
        check_number("train_limit", self.train_limit, lo=0, integer=True)
        check_choice("label", self.label, ("group", "subgroup"))
        if self.latents and self.stem_init == "pca":
            raise ConfigError("stem_init=pca works on images in [-1, 1], not on latents; use stem_init=kaiming")
        if self.latents and self.trivial_augment:
            raise ConfigError("trivial_augment works on images in [-1, 1], not on latents; use trivial_augment=false")
        check_number("image_size", self.image_size, lo=8, hi=512, integer=True)


def build_classifier(cfg: ClassifierConfig | None = None) -> ResNet:
    """Return a freshly initialised ResNet for `cfg.model` (seeded with cfg.seed)."""
    cfg = cfg or ClassifierConfig()
    torch.manual_seed(cfg.seed)
    return ResNet(cfg.model)


@dataclass
class ClassificationData:
    """The loaders and the test split of a classifier run: test images [N, C, S, S] (uint8, or float32
    normalised latents), labels int64 [N]."""

    dls: DataLoaders
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]


def _latent_classification_data(cfg: ClassifierConfig) -> ClassificationData:
    """Posterior means of encoded images, normalised per channel with the training set's mean and std."""
    from ..data.latents import read_latents

    train, test = (read_latents(cfg.latents, split=s) for s in ("train", "test"))
    if train.vae_sha256 != test.vae_sha256:
        raise ConfigError(f"the train and test latents in {cfg.latents} come from different VAEs; encode both "
                          "with one (`minidiffusion encode VAE --out DIR` writes both splits)")
    x_tr, x_te = (torch.from_numpy(np.array(s.moments[:, 0])) for s in (train, test))
    mean, std = x_tr.mean(dim=(0, 2, 3), keepdim=True), x_tr.std(dim=(0, 2, 3), keepdim=True)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    y_tr, y_te = (torch.from_numpy(np.array(s.label_column(cfg.label))) for s in (train, test))
    if cfg.train_limit:
        x_tr, y_tr = x_tr[: cfg.train_limit], y_tr[: cfg.train_limit]
    dls = DataLoaders(TensorLoader(x_tr, y_tr, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed),
                      TensorLoader(x_te, y_te, batch_size=1000))
    return ClassificationData(dls, x_te, y_te, train.class_names(cfg.label))


def _labelled_classification_data(cfg: ClassifierConfig, train, test) -> ClassificationData:
    """Loaders over two folders.LabelledImages (the first `train_limit` training images when set)."""
    tr = (train.images, train.labels)
    tr = tuple(t[: cfg.train_limit] for t in tr) if cfg.train_limit else tr
    te = (test.images, test.labels)
    dls = uint8_loaders(tr, te, cfg.batch_size, seed=cfg.seed, valid_batch_size=1000)
    return ClassificationData(dls, *te, list(train.class_names))


def load_classification_data(cfg: ClassifierConfig) -> ClassificationData:
    """Return the data `cfg` names: encoded latents, Fashion-MNIST (train / test), the emoji set (its split) or the
    instrument spectrograms (their split; labels: the ten families), the sprites (their split) or Tiny ImageNet
    (train / val)."""
    if cfg.latents:
        return _latent_classification_data(cfg)
    if cfg.data == "instruments":
        from ..data.sets import load_image_set

        train = load_image_set("instruments", "train", limit=cfg.train_limit)
        test = load_image_set("instruments", "test")
        dls = uint8_loaders((train.images, train.labels), (test.images, test.labels), cfg.batch_size, seed=cfg.seed,
                            valid_batch_size=1000)
        return ClassificationData(dls, test.images, test.labels, train.class_names)
    if cfg.data == "emoji":
        from ..data.emoji import load_emoji

        train, test = (load_emoji(s, image_size=cfg.image_size) for s in ("train", "test"))
        names = train.group_names if cfg.label == "group" else train.subgroup_names
        tr = (train.images, train.labels(cfg.label))
        tr = tuple(t[: cfg.train_limit] for t in tr) if cfg.train_limit else tr
        te = (test.images, test.labels(cfg.label))
        dls = uint8_loaders(tr, te, cfg.batch_size, seed=cfg.seed, valid_batch_size=1000)
        return ClassificationData(dls, *te, list(names))
    if cfg.data == "sprites":
        from ..data.sprites import load_sprites

        return _labelled_classification_data(cfg, *(load_sprites(s, image_size=cfg.image_size)
                                                    for s in ("train", "test")))
    from ..data.folders import is_tiny_imagenet, load_tiny_imagenet

    if cfg.data and is_tiny_imagenet(cfg.data):  # train / val
        return _labelled_classification_data(cfg, *load_tiny_imagenet(cfg.data, image_size=cfg.image_size))
    path = None if cfg.data in ("", "fashion-mnist") else cfg.data
    dls = fashion_mnist_loaders(cfg.batch_size, path=path, seed=cfg.seed, valid_batch_size=1000,
                                train_limit=cfg.train_limit or None)
    return ClassificationData(dls, *load_fashion_mnist("test", path=path), list(FASHION_MNIST_CLASSES))


def resolve_config(cfg: ClassifierConfig, data: ClassificationData) -> ClassifierConfig:
    """Return `cfg` with the network's input channels, class count and image size taken from the data."""
    x = data.test_images
    model = dataclasses.replace(cfg.model, in_channels=x.shape[1], n_classes=len(data.class_names),
                                image_size=x.shape[-1])
    return dataclasses.replace(cfg, model=model)


def classifier_learner(cfg: ClassifierConfig, out: str | Path | None = None, progress: bool = True,
                       data: ClassificationData | None = None) -> Learner:
    """Return a Learner wired with the recipe's callbacks (device, precision, one-cycle, metrics, ...).

    Fit it for `fit_epochs(cfg)` epochs (the `minutes` budget, when set, ends it). `data` (default:
    loaded from cfg) must be what `cfg` was resolved against.
    """
    device = resolve_device(cfg.device)
    data = data if data is not None else load_classification_data(cfg)
    model = build_classifier(cfg)
    dls = data.dls
    if cfg.stem_init == "pca":  # as many patches as 2,048 32x32 images give, whatever the image size
        side = dls.train.tensors[0].shape[-1]
        n = max(64, PCA_IMAGES * 1024 // (side * side))
        pca_init_(model.stem, uint8_to_float(dls.train.tensors[0][:n]))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    aug = BatchAugment(pad=cfg.pad, flip=cfg.flip, erase=cfg.erase, fill=0.0 if cfg.latents else -1.0)
    if cfg.trivial_augment:  # the per-image op first, then the batch's crop, flip and erasing
        aug = _then(TrivialAugment(pad=0, flip=0.0), aug)
    _, mp = precision_callback(cfg.precision, device)
    if cfg.minutes > 0:
        sched = TimeBudgetCB(cfg.minutes, cfg.lr, pct_start=cfg.pct_start)
    else:
        sched = OneCycleCB(cfg.lr, pct_start=cfg.pct_start, anneal_strategy=cfg.anneal)
    cbs = [DeviceCB(device), BatchTransformCB(lambda x: aug(x).contiguous(memory_format=fmt)),
           MetricsCB(accuracy=True), sched, NaNGuardCB(), *training_cbs(cfg.seed, cfg.sync_bn)]
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
    return Learner(model, dls, loss, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)


def _then(first, second):
    return lambda x: second(first(x))


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
    directory receives config.toml, metrics.jsonl, loss.png, checkpoints/ and model.safetensors +
    model.toml (the network's ResNetConfig: a classifier component, e.g. a FID feature network).
    """
    resolve_device(cfg.device)  # a device or data set this machine lacks is refused before anything is written
    data = load_classification_data(cfg)
    cfg = resolve_config(cfg, data)
    out = start_run(out, cfg, resume=resume, replace=replace)
    start = time.time()
    learn = classifier_learner(cfg, out, progress=progress, data=data)
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    model = learn.model
    x_test, y_test = data.test_images, data.test_labels
    x_test = uint8_to_float(x_test) if x_test.dtype == torch.uint8 else x_test
    precision = precision_of(learn)
    ac = torch.bfloat16 if precision == "bf16" else None
    acc_plain = evaluate_accuracy(model, x_test, y_test, tta=False, autocast=ac)
    acc_tta = evaluate_accuracy(model, x_test, y_test, tta=True, autocast=ac)
    seconds = time.time() - start
    save_component(out / MODEL, float32_state(model), model.cfg, "classifier")
    return {
        "test_accuracy": acc_tta if cfg.tta else acc_plain,
        "test_accuracy_plain": acc_plain,
        "test_accuracy_tta": acc_tta,
        "epochs": ((learn.cb(MetricsCB).latest("train") or {}).get("epoch", -1) + 1),
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "precision": precision,
        "device": str(next(model.parameters()).device),
        "run_dir": str(out),
    }

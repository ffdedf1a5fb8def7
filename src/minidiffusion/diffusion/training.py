"""Training a diffusion model: the same Learner as the classifier plus one callback.

`DiffusionCB` replaces the Learner's `predict` stage: it takes the clean batch (images in
[-1, 1], optional labels), lets the objective noisify it and computes the objective's loss,
dropping labels to the "no label" index with probability `cond_drop` so the same network
learns the unconditional model that classifier-free guidance needs.

`train_diffusion(cfg, out)` is the recipe behind `minidiffusion train PRESET`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..config import save_config, to_dict
from ..data.images import check_range
from ..errors import ConfigError
from ..learner import Callback, Learner
from ..learner.callbacks import DeviceCB, MetricsCB, resolve_device
from ..learner.checkpoint import CheckpointCB
from ..learner.ema import EMACB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import check_precision, precision_callback
from ..learner.progress import ProgressCB
from ..learner.schedules import OneCycleCB
from ..learner.time_budget import TimeBudgetCB
from ..nn.unet import UNet, UNetConfig, drop_labels
from ..runs import check_same_config, prepare_run_dir
from .fid_callback import FIDCB
from .objectives import Objective, get_objective

__all__ = ["DiffusionConfig", "DiffusionCB", "build_objective", "load_training_data", "diffusion_learner",
           "train_diffusion"]


@dataclass
class DiffusionConfig:
    """A diffusion run: data, network, objective, optimisation and default sampling settings."""

    model: UNetConfig = field(default_factory=UNetConfig)
    data: str = "fashion-mnist"  # or a folder of PNG/JPEG images (class sub-folders become labels)
    image_size: int = 32  # for folders; Fashion-MNIST is always 32 (28 padded)
    channels: int = 0  # for folders: 1, 3, or 0 = detect
    train_limit: int = 0  # train on the first N images only (0 = all): quick tries and tests
    objective: str = "edm"  # ddpm | cosine | edm
    prediction: str = "v"  # cosine only: eps | v
    sigma_data: float = 0.5  # edm only: std of the data (0.5 for images in [-1, 1])
    conditional: bool = True  # learn p(x | label) with a null label for guidance (needs labels)
    cond_drop: float = 0.1  # probability of replacing the label with "no label" during training
    epochs: int = 10
    minutes: float = 0.0  # > 0: train for this wall-clock budget (one-cycle over time) instead of epochs
    batch_size: int = 128
    lr: float = 2e-3  # one-cycle peak, AdamW
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto = bf16 on CUDA or AVX512-bf16 CPUs)
    channels_last: bool = True
    compile: bool = False  # torch.compile the network
    seed: int = 0
    device: str = "auto"
    sampler: str = "dpmpp_2m"  # defaults for `sample` and the end-of-training grid
    steps: int = 20
    guidance: float = 1.0
    fid_every: int = 0  # > 0: FID of fid_n samples every this many epochs (and at the end), beside the loss
    fid_n: int = 500

    def __post_init__(self):
        if self.objective not in ("ddpm", "cosine", "edm"):
            raise ValueError(f"objective must be ddpm, cosine or edm, got {self.objective!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        check_precision(self.precision)
        if self.fid_every < 0 or self.fid_n < 2:
            raise ValueError(f"fid_every must be >= 0 and fid_n >= 2, got {self.fid_every} and {self.fid_n}")


def build_objective(cfg: DiffusionConfig) -> Objective:
    """Return the training objective named by `cfg.objective` with its options."""
    if cfg.objective == "cosine":
        return get_objective("cosine", prediction=cfg.prediction, time_scale=1000.0, min_alpha_bar=1e-4)
    if cfg.objective == "edm":
        return get_objective("edm", sigma_data=cfg.sigma_data)
    return get_objective("ddpm")


class DiffusionCB(Callback):
    """Replace `predict`/`get_loss`: loss = objective.loss(model, x0, label=...) on the clean batch.

    Validation batches use a fixed generator (re-seeded each epoch), so validation losses of
    different epochs see the same noise and are comparable.
    """

    order = 10

    def __init__(self, objective: Objective, n_classes: int = 0, cond_drop: float = 0.0, seed: int = 0):
        self.objective, self.n_classes, self.cond_drop, self.seed = objective, n_classes, cond_drop, seed

    def before_epoch(self, learn) -> None:
        self._valid_gen = None
        if not learn.training:
            dev = next(learn.model.parameters()).device
            self._valid_gen = torch.Generator(dev).manual_seed(self.seed + 12345)

    def predict(self, learn) -> None:
        x0 = learn.batch[0]
        cond = {}
        if self.n_classes:
            labels = learn.batch[1]
            if learn.training and self.cond_drop:
                labels = drop_labels(labels, self.cond_drop, self.n_classes)
            cond["label"] = labels
        learn.preds = None
        learn.loss = self.objective.loss(learn.model, x0, generator=self._valid_gen, **cond)

    def get_loss(self, learn) -> None:
        pass  # computed together with the prediction in `predict`


def load_training_data(cfg: DiffusionConfig):
    """Return (DataLoaders yielding (images [-1, 1], labels), class names or None) for `cfg.data`.

    Also completes `cfg` from the data: image_size, model.in_channels/out_channels and
    model.n_classes (the number of classes when `conditional`, else 0).
    """
    if cfg.data == "fashion-mnist":
        from ..data.fashion_mnist import CLASSES, fashion_mnist_loaders

        dls = fashion_mnist_loaders(cfg.batch_size, seed=cfg.seed, valid_batch_size=500,
                                    train_limit=cfg.train_limit or None, valid_limit=2000)
        class_names, channels, cfg.image_size = list(CLASSES), 1, 32
    else:
        from ..data.folders import image_folder_loaders

        dls = image_folder_loaders(cfg.data, cfg.image_size, batch_size=cfg.batch_size,
                                   channels=cfg.channels or None, seed=cfg.seed)
        class_names, channels = dls.class_names, dls.train.tensors[0].shape[1]
    if cfg.conditional and not class_names:
        raise ConfigError(f"conditional=true needs labels, but {cfg.data} has no class sub-folders; "
                          "pass conditional=false")
    cfg.model.in_channels = cfg.model.out_channels = channels
    cfg.model.n_classes = len(class_names) if cfg.conditional else 0
    return dls, class_names


class _RangeCheckCB(Callback):
    """Check once, on the first training batch, that images follow the [-1, 1] contract."""

    order = -4

    def before_fit(self, learn) -> None:
        self.done = False

    def before_batch(self, learn) -> None:
        if not self.done:
            check_range(learn.batch[0], "training images")
            self.done = True


def diffusion_learner(cfg: DiffusionConfig, net: torch.nn.Module, dls, n_classes: int, device: torch.device,
                      out: Path | None = None, progress: bool = True) -> Learner:
    """Return a Learner that trains `net` (any `net(x_in, noise_level, **cond)`) with cfg's objective,
    label dropout, EMA, precision and schedule (`epochs`, or a `minutes` budget), and checkpoints
    when a run directory `out` is given. Call `learn.fit(learn.fit_epochs)`; `learn.precision`
    says which precision was chosen and `learn.cb(EMACB).ema_model` holds the EMA weights.
    """
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    cbs = [DeviceCB(device), _RangeCheckCB(),
           DiffusionCB(build_objective(cfg), n_classes, cfg.cond_drop, cfg.seed),
           MetricsCB(), NaNGuardCB(), EMACB(cfg.ema_decay), ProgressCB(show=progress)]
    if out is not None:
        cbs.append(CheckpointCB(config=to_dict(cfg)))
    if cfg.fid_every:
        if cfg.data != "fashion-mnist":
            raise ConfigError("fid_every needs data=fashion-mnist: FID is measured against its test set with the "
                              "shipped classifier's features (for other data, add FIDCB with your feature_net)")
        cbs.append(FIDCB(cfg, every=cfg.fid_every, n=cfg.fid_n, seed=cfg.seed, show=progress))
    if cfg.minutes > 0:
        cbs.append(TimeBudgetCB(cfg.minutes, cfg.lr))
        epochs = 10_000  # the budget ends training
    else:
        cbs.append(OneCycleCB(cfg.lr))
        epochs = cfg.epochs
    precision, mp = precision_callback(cfg.precision, device)
    cbs += [mp] if mp else []
    if cfg.compile:
        net.compile()  # in place: state_dict keys (checkpoints, EMA) stay those of the plain module
    opt = partial(torch.optim.AdamW, eps=1e-5, weight_decay=cfg.weight_decay)
    learn = Learner(net, dls, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)
    learn.precision, learn.fit_epochs = precision, epochs
    return learn


def train_diffusion(cfg: DiffusionConfig, out: str | Path, resume: bool = False, progress: bool = True,
                    replace: bool = False) -> dict:
    """Train a diffusion model into run directory `out`; return a summary dict.

    The run directory receives config.toml, metrics.jsonl, loss.png, checkpoints/,
    model.safetensors (the EMA weights, which sampling uses) and a sample grid samples.png.
    The summary holds final train/valid loss, epochs, steps, seconds, params and the paths.
    """
    from .pipeline import DiffusionModel, save_model

    out = prepare_run_dir(out, resume=resume, replace=replace)
    dls, class_names = load_training_data(cfg)
    if resume:  # after the data completed cfg (image size, channels, classes), as the saved config was
        check_same_config(out, cfg)
    n_classes = cfg.model.n_classes
    save_config(cfg, out / "config.toml")

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = UNet(cfg.model)
    learn = diffusion_learner(cfg, net, dls, n_classes, device, out=out, progress=progress)
    start = time.time()
    learn.fit(learn.fit_epochs, resume=resume)
    seconds = time.time() - start
    ema = learn.cb(EMACB)
    save_model(ema.ema_model, cfg, class_names, out / "model.safetensors")
    dm = DiffusionModel.from_run(out, device=device)
    grid = dm.sample_grid(out / "samples.png", seed=cfg.seed)
    metrics = learn.cb(MetricsCB)
    train_rec, valid_rec = metrics.latest("train"), metrics.latest("valid")
    return {
        "train_loss": train_rec["loss"] if train_rec else None,
        "valid_loss": valid_rec["loss"] if valid_rec else None,
        "epochs": (train_rec or {}).get("epoch", -1) + 1,
        "steps": learn.step,
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "precision": learn.precision,
        "device": str(device),
        "run_dir": str(out),
        "samples": str(grid),
    }

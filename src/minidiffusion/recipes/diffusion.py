"""The diffusion recipe: the same Learner as the classifier plus one callback (recipes/callbacks.py).

`train_diffusion(cfg, out)` is what `minidiffusion train fmnist` (and the other diffusion presets)
runs: load the data, build the U-Net, train it with the config's objective, label dropout, EMA,
precision and schedule (`epochs`, or a `minutes` wall-clock budget), then save the EMA weights
as the run's model (pipelines/image.py loads it) and sample a grid.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from ..config import check_choice, check_number, to_dict
from ..device import check_precision, resolve_device
from ..diffusion.config import build_objective
from ..errors import ConfigError
from ..learner import Learner
from ..learner.callbacks import MetricsCB
from ..learner.checkpoint import CheckpointCB
from ..learner.device import DeviceCB
from ..learner.ema import EMACB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback, precision_of
from ..learner.progress import ProgressCB
from ..learner.schedules import OneCycleCB
from ..learner.time_budget import TimeBudgetCB
from ..metrics.evaluate import FEATURE_NETWORKS
from ..nn.unet import UNet
from ..paths import atomic_write
from ..pipelines.image import DiffusionModel, DiffusionModelConfig, save_model
from ..runs import MODEL, SAMPLES
from .callbacks import FIDCB, DiffusionCB, RangeCheckCB
from .common import fit_epochs, is_main, start_run, training_cbs

__all__ = ["DiffusionConfig", "TrainingData", "load_training_data", "resolve_config", "diffusion_learner",
           "train_diffusion"]


@dataclass
class DiffusionConfig(DiffusionModelConfig):
    """A diffusion run: what the model means (DiffusionModelConfig: objective, network, image size,
    sampling defaults), plus data and optimisation. Saved as the run's config.toml."""

    recipe: ClassVar[str] = "diffusion"

    channels: int = 0  # for folders: 1, 3, or 0 = detect
    label: str = "group"  # emoji (pixels or latents): the labels to condition on, group | subgroup
    latents: str = ""  # a folder written by `minidiffusion encode`: train on its latents (latent diffusion)
    vae: str = ""  # the autoencoder that encoded them (default: the one the latents folder names)
    train_limit: int = 0  # train on the first N images only (0 = all; Fashion-MNIST, emoji, instruments): quick tries
    valid_limit: int = 2000  # validate on the first N held-out images (0 = all; Fashion-MNIST, emoji, instruments)
    conditional: bool = True  # learn p(x | label) with a null label for guidance (needs labels)
    cond_drop: float = 0.1  # probability of replacing the label with "no label" during training
    epochs: int = 10
    minutes: float = 0.0  # > 0: train for this wall-clock budget (one-cycle over time) instead of epochs
    batch_size: int = 128
    lr: float = 2e-3  # one-cycle peak, AdamW
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto = bf16 on CUDA or AVX512-bf16 CPUs)
    compile: bool = False  # torch.compile the network
    seed: int = 0
    device: str = "auto"
    fid_every: int = 0  # > 0: FID of fid_n samples every this many epochs (and at the end), beside the loss
    fid_n: int = 500

    def __post_init__(self):
        super().__post_init__()
        check_choice("channels", self.channels, (0, 1, 3))
        check_number("train_limit", self.train_limit, lo=0, integer=True)
        check_number("valid_limit", self.valid_limit, lo=0, integer=True)
        check_number("cond_drop", self.cond_drop, lo=0.0, hi=1.0, hi_open=True)
        check_number("epochs", self.epochs, lo=1, hi=100_000, integer=True)
        check_number("minutes", self.minutes, lo=0.0, hi=100_000.0)
        check_number("batch_size", self.batch_size, lo=1, hi=65_536, integer=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("weight_decay", self.weight_decay, lo=0.0, hi=10.0)
        check_number("ema_decay", self.ema_decay, lo=0.0, hi=1.0, hi_open=True)
        check_precision(self.precision)
        check_number("seed", self.seed, lo=0, hi=2**63 - 1, integer=True)
        check_number("fid_every", self.fid_every, lo=0, integer=True)
        check_number("fid_n", self.fid_n, lo=2, hi=60_000, integer=True)
        check_choice("label", self.label, ("group", "subgroup"))
        if self.fid_every and not self.latents and self.data not in FEATURE_NETWORKS:
            raise ConfigError(f"fid_every needs data={' or '.join(FEATURE_NETWORKS)}: FID is measured against its "
                              "held-out images with a shipped classifier's features (for other data, add FIDCB with "
                              "your feature_net)")


@dataclass
class TrainingData:
    """The loaders of a diffusion run and what they tell about the images (nothing here changes the config)."""

    dls: object  # DataLoaders yielding (images float32 [B, C, S, S] in [-1, 1] or scaled latents, labels [B])
    class_names: list[str] | None
    channels: int
    image_size: int
    data: str = "fashion-mnist"  # the image set the model learns (for latents: the one they encode)
    vae: str = ""  # latent diffusion: the autoencoder that decodes the latents


def _latent_data(cfg: DiffusionConfig) -> TrainingData:
    from ..data.latents import latent_loaders, read_latents
    from ..pipelines.autoencoder import weights_sha256

    vae = cfg.vae or read_latents(cfg.latents).meta.get("vae", "")
    if not vae:
        raise ConfigError(f"the latents in {cfg.latents} do not name their autoencoder; pass vae=PATH")
    latents = read_latents(cfg.latents, vae_sha256=weights_sha256(vae))
    label = cfg.label if cfg.conditional else None
    dls = latent_loaders(latents, cfg.batch_size, label=label, seed=cfg.seed)
    c, h, _ = latents.latent_shape
    return TrainingData(dls, latents.class_names(label), c, h, latents.meta.get("data", ""), str(vae))


def load_training_data(cfg: DiffusionConfig) -> TrainingData:
    """Return the loaders and image shape of `cfg.latents` (latent diffusion), or of `cfg.data`:
    Fashion-MNIST, the emoji or the instrument spectrograms (1x128x128; their held-out splits
    validate), or a folder of images."""
    if cfg.latents:
        return _latent_data(cfg)
    if cfg.data == "instruments":
        from ..data.loaders import uint8_loaders
        from ..data.sets import load_image_set

        train, test = (load_image_set("instruments", s, limit=n) for s, n in (("train", cfg.train_limit),
                                                                               ("test", cfg.valid_limit)))
        dls = uint8_loaders((train.images, train.labels), (test.images, test.labels), cfg.batch_size, seed=cfg.seed)
        return TrainingData(dls, train.class_names, 1, train.images.shape[-1], "instruments")
    if cfg.data == "fashion-mnist":
        from ..data.fashion_mnist import CLASSES, fashion_mnist_loaders

        dls = fashion_mnist_loaders(cfg.batch_size, seed=cfg.seed, valid_batch_size=500,
                                    train_limit=cfg.train_limit or None, valid_limit=cfg.valid_limit or None)
        return TrainingData(dls, list(CLASSES), 1, 32)
    if cfg.data == "emoji":
        from ..data.loaders import uint8_loaders
        from ..data.sets import load_image_set

        train, test = (load_image_set("emoji", s, cfg.image_size, cfg.label) for s in ("train", "test"))
        tr = (train.images[: cfg.train_limit or None], train.labels[: cfg.train_limit or None])
        va = (test.images[: cfg.valid_limit or None], test.labels[: cfg.valid_limit or None])
        dls = uint8_loaders(tr, va, cfg.batch_size, seed=cfg.seed)
        return TrainingData(dls, train.class_names, 3, cfg.image_size, "emoji")
    from ..data.folders import image_folder_loaders

    dls = image_folder_loaders(cfg.data, cfg.image_size, batch_size=cfg.batch_size,
                               channels=cfg.channels or None, seed=cfg.seed)
    return TrainingData(dls, dls.class_names, dls.train.tensors[0].shape[1], cfg.image_size, cfg.data)


def resolve_config(cfg: DiffusionConfig, data: TrainingData) -> DiffusionConfig:
    """Return a copy of `cfg` completed from the data: image_size, model.in/out_channels, model.n_classes
    (the number of classes when `conditional`, else 0). This resolved config is what the run saves."""
    if cfg.conditional and not data.class_names:
        raise ConfigError(f"conditional=true needs labels, but {cfg.data} has no class sub-folders; "
                          "pass conditional=false")
    if cfg.fid_every and data.data not in FEATURE_NETWORKS:
        raise ConfigError(f"fid_every needs images of {' or '.join(FEATURE_NETWORKS)}, but {cfg.latents or cfg.data} "
                          f"holds {data.data or 'images of no known set'}; drop fid_every")
    n_classes = len(data.class_names) if cfg.conditional else 0
    model = dataclasses.replace(cfg.model, in_channels=data.channels, out_channels=data.channels, n_classes=n_classes)
    if model.mid_type == "transformer":  # the position embedding covers the lowest-resolution map
        model = dataclasses.replace(model, mid_size=data.image_size // model.size_factor)
    return dataclasses.replace(cfg, image_size=data.image_size, model=model, data=data.data, vae=data.vae)


def _ema_sampler(cfg: DiffusionConfig):
    """Return FIDCB's sample function: the EMA weights, balanced labels, the precision training uses
    (latents decoded by the run's VAE)."""
    vae = None
    if cfg.latents:
        from ..pipelines.autoencoder import load_autoencoder

        vae = load_autoencoder(cfg.vae)

    def sample(learn, n: int, seed: int) -> torch.Tensor:
        net = learn.cb(EMACB).ema_model
        model = DiffusionModel(net, cfg, device=next(net.parameters()).device, vae=vae)
        return model.sample(n, seed=seed, precision=precision_of(learn))[0]

    return sample


def diffusion_learner(cfg: DiffusionConfig, net: torch.nn.Module, dls, device: torch.device,
                      out: Path | None = None, progress: bool = True) -> Learner:
    """Return a Learner that trains `net` (any `net(x_in, noise_level, **cond)`) with cfg's objective,
    label dropout, EMA, precision and schedule (`epochs`, or a `minutes` budget: fit it for
    `fit_epochs(cfg)` epochs), and checkpoints when a run directory `out` is given.
    `learn.cb(EMACB).ema_model` holds the EMA weights. `cfg` is the resolved config (`resolve_config`).
    """
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    n_classes = cfg.model.n_classes
    cbs = [DeviceCB(device), *([] if cfg.latents else [RangeCheckCB()]),  # latents are not images in [-1, 1]
           DiffusionCB(build_objective(cfg), n_classes, cfg.cond_drop, cfg.seed),
           MetricsCB(), NaNGuardCB(), EMACB(cfg.ema_decay), ProgressCB(show=progress), *training_cbs(cfg.seed)]
    if out is not None:
        cbs.append(CheckpointCB(config=to_dict(cfg)))
    if cfg.fid_every:
        cbs.append(FIDCB(_ema_sampler(cfg), every=cfg.fid_every, n=cfg.fid_n, seed=cfg.seed, show=progress,
                         data=cfg.data))
    cbs.append(TimeBudgetCB(cfg.minutes, cfg.lr) if cfg.minutes > 0 else OneCycleCB(cfg.lr))
    _, mp = precision_callback(cfg.precision, device)
    cbs += [mp] if mp else []
    if cfg.compile:
        net.compile()  # in place: state_dict keys (checkpoints, EMA) stay those of the plain module
    opt = partial(torch.optim.AdamW, eps=1e-5, weight_decay=cfg.weight_decay)
    return Learner(net, dls, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)


def copy_autoencoder(vae: str | Path, out: Path) -> None:
    """Put the autoencoder a latent run decodes with into the run directory (vae.safetensors + vae.toml, or a
    diffusers folder vae/), so the run is a self-contained pipeline."""
    from ..pipelines.autoencoder import autoencoder_files

    src = Path(vae)
    if src.is_dir() and (src / "config.json").is_file() and not (src / "model.safetensors").is_file():
        shutil.copytree(src, out / "vae", dirs_exist_ok=True)
        return
    weights = autoencoder_files(vae)
    for suffix in (".safetensors", ".toml"):
        with atomic_write(out / f"vae{suffix}") as tmp:
            shutil.copyfile(weights.with_suffix(suffix), tmp)


def train_diffusion(cfg: DiffusionConfig, out: str | Path, resume: bool = False, progress: bool = True,
                    replace: bool = False) -> dict:
    """Train a diffusion model into run directory `out`; return a summary dict.

    The run directory receives config.toml, metrics.jsonl, loss.png, checkpoints/,
    model.safetensors + model.toml (the EMA weights, which sampling uses) and a sample grid samples.png.
    The summary holds final train/valid loss, epochs, steps, seconds, params and the paths.
    """
    device = resolve_device(cfg.device)  # what the machine lacks is refused before anything is written
    data = load_training_data(cfg)
    cfg = resolve_config(cfg, data)
    # a resumed run is checked with the config the data completed (image size, channels, classes), as saved
    out = start_run(out, cfg, resume=resume, replace=replace)

    torch.manual_seed(cfg.seed)
    net = UNet(cfg.model)
    learn = diffusion_learner(cfg, net, data.dls, device, out=out, progress=progress)
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    seconds = time.time() - start
    save_model(learn.cb(EMACB).ema_model, cfg, data.class_names, out / MODEL)
    if cfg.latents:
        copy_autoencoder(cfg.vae, out)
    dm = DiffusionModel.from_run(out, device=device)
    grid = dm.sample_grid(out / SAMPLES, seed=cfg.seed)
    metrics = learn.cb(MetricsCB)
    train_rec, valid_rec = metrics.latest("train"), metrics.latest("valid")
    budget = learn.cb(TimeBudgetCB)
    return {
        "train_seconds": round(budget.seconds, 1) if budget else None,  # batches only, with a minutes= budget
        "images_per_second": round(learn.step * cfg.batch_size / budget.seconds, 1) if budget and budget.seconds
        else None,
        "train_loss": train_rec["loss"] if train_rec else None,
        "valid_loss": valid_rec["loss"] if valid_rec else None,
        "epochs": (train_rec or {}).get("epoch", -1) + 1,
        "steps": learn.step,
        "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "precision": precision_of(learn),
        "device": str(device),
        "run_dir": str(out),
        "samples": str(grid),
    }

"""Autoencoder recipes (lesson 25): the course's MLP autoencoder/VAE, and the convolutional KL autoencoder.

`mlp_autoencoder` (presets fmnist-ae, fmnist-vae): BCE on the pixels plus, for the VAE, the KL
divergence of the posterior from N(0, I), the two on similar scales (`kl_weight`); BCE and KLD are
recorded per epoch.

`vae` (presets emoji-vae, emoji-vae-f8): Stable Diffusion's autoencoder recipe at small scale:
L1 (or MSE) reconstruction + `perceptual_weight` x MSE of a classifier's features (a network trained
here, no downloaded VGG/LPIPS) + `kl_weight` x the KL (summed over the latent, per image pixel, as
Stable Diffusion's 1e-6 is) + optionally a patch-GAN hinge loss from optimizer step `gan_start` on.
After training, the latent scale factor is computed as 1 / std of the training latents and saved in
the model's config, so pipelines apply it and users never do.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..artifacts import save_component
from ..config import check_choice, check_number, to_dict
from ..data.augment import random_flip
from ..data.images import save_grid, uint8_to_float
from ..data.loaders import uint8_loaders
from ..data.sets import load_image_set
from ..device import check_precision, resolve_device
from ..errors import ConfigError
from ..learner import Callback, Learner
from ..learner.callbacks import BatchTransformCB, MetricsCB
from ..learner.checkpoint import CheckpointCB
from ..learner.device import DeviceCB
from ..learner.distributed import average_gradients
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback, precision_of
from ..learner.progress import ProgressCB
from ..learner.schedules import OneCycleCB
from ..learner.time_budget import TimeBudgetCB
from ..metrics.image_quality import psnr, ssim
from ..nn.autoencoder import MLPAutoencoder, MLPAutoencoderConfig, bce_loss, kl_divergence_mean
from ..nn.discriminator import DiscriminatorConfig, PatchDiscriminator, d_hinge_loss, g_hinge_loss
from ..nn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, latent_scale_factor
from ..paths import float32_state
from ..runs import MODEL
from .common import fit_epochs, is_main, start_run, training_cbs

__all__ = ["MLPAutoencoderTrainConfig", "VAETrainConfig", "MLPAutoencoderCB", "VAECB", "train_mlp_autoencoder",
           "train_vae", "scale_factor_of"]


def _check_training(cfg) -> None:
    check_number("epochs", cfg.epochs, lo=1, hi=100_000, integer=True)
    check_number("minutes", cfg.minutes, lo=0.0, hi=100_000.0)
    check_number("batch_size", cfg.batch_size, lo=1, hi=65_536, integer=True)
    check_number("lr", cfg.lr, lo=0.0, lo_open=True, hi=10.0)
    check_number("weight_decay", cfg.weight_decay, lo=0.0, hi=10.0)
    check_number("kl_weight", cfg.kl_weight, lo=0.0, hi=1e6)
    check_number("train_limit", cfg.train_limit, lo=0, integer=True)
    check_number("seed", cfg.seed, lo=0, hi=2**63 - 1, integer=True)
    check_precision(cfg.precision)


@dataclass
class MLPAutoencoderTrainConfig:
    """An MLP autoencoder or VAE run on Fashion-MNIST (`model.variational` picks which)."""

    recipe: ClassVar[str] = "mlp_autoencoder"

    model: MLPAutoencoderConfig = field(default_factory=MLPAutoencoderConfig)
    data: str = "fashion-mnist"
    train_limit: int = 0
    epochs: int = 10
    minutes: float = 0.0
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    kl_weight: float = 1.0  # the course keeps BCE and KLD (both means per element) on similar scales
    precision: str = "fp32"
    seed: int = 0
    sync_bn: bool = True  # under torchrun: batch norms use the global batch's statistics (as one process)
    device: str = "auto"

    def __post_init__(self):
        _check_training(self)


@dataclass
class VAETrainConfig:
    """A convolutional KL autoencoder run: data, network, the loss terms and optimisation."""

    recipe: ClassVar[str] = "vae"

    model: VAEConfig = field(default_factory=lambda: VAEConfig(channels=(32, 64, 128), norm_groups=8))
    disc: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(channels=32, n_layers=2,
                                                                                  norm="group", norm_groups=8))
    data: str = "emoji"  # emoji | photos | fashion-mnist | a folder of images
    image_size: int = 64
    n_crops: int = 4096  # photos: training crops (held-out crops: a quarter as many)
    train_limit: int = 0
    epochs: int = 10
    minutes: float = 0.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    rec_loss: str = "l1"  # l1 | mse, per pixel
    kl_weight: float = 1e-6  # x the KL summed over the latent, divided by the image's pixel count
    perceptual: str = ""  # feature network (classifier run or .safetensors): MSE of its features is added
    perceptual_weight: float = 0.1
    gan_weight: float = 0.0  # > 0: a patch-GAN hinge loss for the decoder
    gan_start: int = 0  # optimizer step from which the GAN loss counts (the discriminator trains from step 0)
    disc_lr: float = 2e-4
    flip: float = 0.5  # horizontal flips of the training images
    precision: str = "auto"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _check_training(self)
        check_number("image_size", self.image_size, lo=8, hi=1024, integer=True)
        if self.image_size % self.model.downsample_factor:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the autoencoder's downsampling "
                              f"factor {self.model.downsample_factor}")
        check_number("n_crops", self.n_crops, lo=1, hi=1_000_000, integer=True)
        check_choice("rec_loss", self.rec_loss, ("l1", "mse"))
        check_number("perceptual_weight", self.perceptual_weight, lo=0.0, hi=1e6)
        check_number("gan_weight", self.gan_weight, lo=0.0, hi=1e6)
        check_number("gan_start", self.gan_start, lo=0, integer=True)
        check_number("disc_lr", self.disc_lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("flip", self.flip, lo=0.0, hi=1.0)


class MLPAutoencoderCB(Callback):
    """The MLP autoencoder's stages: loss = BCE + kl_weight * KLD (VAE), both means per element."""

    order = 10

    def __init__(self, kl_weight: float):
        self.kl_weight = kl_weight

    def predict(self, learn) -> None:
        x = learn.batch[0]
        out = learn.model(x)
        bce = bce_loss(out.logits.float(), x)
        parts = {"bce": bce}
        if out.logvar is not None:
            parts["kld"] = kl_divergence_mean(out.mu.float(), out.logvar.float())
        learn.preds, learn.loss_parts = out, parts
        learn.loss = bce + self.kl_weight * parts.get("kld", 0.0)

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction


class VAECB(Callback):
    """The KL autoencoder's stages: reconstruction + perceptual + KL (+ GAN); owns the discriminator.

    Validation reconstructs from the posterior mean and records PSNR too. The discriminator and its
    optimizer are part of the checkpointed state, so `--resume` continues the GAN exactly.
    """

    order = 10
    state_key = "VAECB"

    def __init__(self, cfg: VAETrainConfig, features=None):
        self.cfg, self.features = cfg, features
        self.disc = PatchDiscriminator(cfg.disc) if cfg.gan_weight > 0 else None
        self.disc_opt, self._pending = None, None

    def before_fit(self, learn) -> None:
        if self.disc is not None:
            self.disc.to(next(learn.model.parameters()).device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.9))
            if self._pending is not None:
                self.load_state_dict(self._pending)
        if self.features is not None:
            self.features.to(next(learn.model.parameters()).device)

    def predict(self, learn) -> None:
        x, cfg = learn.batch[0], self.cfg
        x_hat, post = learn.model(x, sample=learn.training)
        x_hat = x_hat.float()
        rec = (x_hat - x).abs().mean() if cfg.rec_loss == "l1" else (x_hat - x).pow(2).mean()
        kl = DiagonalGaussian(post.mean.float(), post.logvar.float()).kl().mean() / x[0].numel()
        parts = {"rec": rec, "kl": kl}
        loss = rec + cfg.kl_weight * kl
        if self.features is not None and cfg.perceptual_weight > 0:
            with torch.autocast(x.device.type, enabled=False):
                f_hat = self.features.model.features(x_hat.clamp(-1, 1))
                with torch.no_grad():
                    f = self.features.model.features(x)
            parts["perceptual"] = F.mse_loss(f_hat, f)
            loss = loss + cfg.perceptual_weight * parts["perceptual"]
        if self.disc is not None and learn.training and learn.step >= cfg.gan_start:
            parts["g_gan"] = g_hinge_loss(self.disc(x_hat).float())
            loss = loss + cfg.gan_weight * parts["g_gan"]
        if not learn.training:
            parts["psnr"] = psnr(x_hat.detach().clamp(-1, 1), x).mean()
        learn.preds, learn.loss, learn.loss_parts = x_hat, loss, parts

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction

    def after_step(self, learn) -> None:
        if self.disc is None:
            return
        x, fake = learn.batch[0], learn.preds.detach()
        d_loss = d_hinge_loss(self.disc(x).float(), self.disc(fake).float())
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        average_gradients(self.disc)  # the same step in every process (torchrun)
        self.disc_opt.step()

    def state_dict(self) -> dict:
        """Return the discriminator's weights and optimizer state ({} without a GAN)."""
        if self.disc is None or self.disc_opt is None:
            return dict(self._pending or {})
        return {"disc": self.disc.state_dict(), "opt": self.disc_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (applied in before_fit when the optimizer does not exist yet)."""
        if self.disc is None or not state:
            return
        if self.disc_opt is None:
            self._pending = state
            return
        self.disc.load_state_dict(state["disc"])
        self.disc_opt.load_state_dict(state["opt"])
        self._pending = None


def _schedule(cfg) -> Callback:
    return TimeBudgetCB(cfg.minutes, cfg.lr) if cfg.minutes > 0 else OneCycleCB(cfg.lr)


def _learner(cfg, model, dls, stage: Callback, device, out, progress, augment=None) -> Learner:
    cbs = [DeviceCB(device), stage, MetricsCB(), NaNGuardCB(), ProgressCB(show=progress), _schedule(cfg),
           *training_cbs(cfg.seed, getattr(cfg, "sync_bn", False))]  # the conv VAE has group norms only
    if augment is not None:
        cbs.append(BatchTransformCB(augment))
    _, mp = precision_callback(cfg.precision, device)
    cbs += [mp] if mp else []
    if out is not None:
        cbs.append(CheckpointCB(config=to_dict(cfg)))
    opt = partial(torch.optim.AdamW, eps=1e-5, weight_decay=cfg.weight_decay)
    return Learner(model, dls, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)


def _summary(learn, start: float, out: Path, device, **extra) -> dict:
    metrics = learn.cb(MetricsCB)
    train, valid = metrics.latest("train") or {}, metrics.latest("valid") or {}
    return {"train_loss": train.get("loss"), "valid_loss": valid.get("loss"), "epochs": train.get("epoch", -1) + 1,
            "steps": learn.step, "seconds": round(time.time() - start, 1), "precision": precision_of(learn),
            "params": sum(p.numel() for p in learn.model.parameters()), "device": str(device),
            "run_dir": str(out), **{k: v for k, v in valid.items() if k not in ("epoch", "phase", "step", "loss")},
            **extra}


def _limit(images: torch.Tensor, n: int) -> torch.Tensor:
    return images[:n] if n else images


def train_mlp_autoencoder(cfg: MLPAutoencoderTrainConfig, out: str | Path, resume: bool = False,
                          progress: bool = True, replace: bool = False) -> dict:
    """Train the MLP autoencoder/VAE into run directory `out`; return a summary (loss, bce, kld per phase).

    Writes config.toml, metrics.jsonl, loss.png, checkpoints/, model.safetensors + model.toml and
    reconstructions.png (test images over their reconstructions; for a VAE a third row decodes noise).
    """
    device = resolve_device(cfg.device)
    train, test = (load_image_set(cfg.data, s, label=None) for s in ("train", "test"))
    x_tr, x_te = _limit(train.images, cfg.train_limit), test.images[:2000]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_shape=tuple(x_tr.shape[1:])))
    out = start_run(out, cfg, resume=resume, replace=replace)
    torch.manual_seed(cfg.seed)
    model = MLPAutoencoder(cfg.model)
    dls = uint8_loaders((x_tr,), (x_te,), cfg.batch_size, seed=cfg.seed)
    learn = _learner(cfg, model, dls, MLPAutoencoderCB(cfg.kl_weight), device, out, progress)
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    model = learn.model.eval()
    save_component(out / MODEL, float32_state(model), cfg.model, "mlp-autoencoder")
    with torch.no_grad():
        x = uint8_to_float(test.images[:16]).to(device)
        rows = [x, model.decode(model.encode(x))]
        if cfg.model.variational:
            rows.append(model.decode(torch.randn(16, cfg.model.latent, generator=torch.Generator().manual_seed(0))
                                     .to(device)))
    save_grid(torch.cat(rows).cpu(), out / "reconstructions.png", nrow=16, scale=2)
    return _summary(learn, start, out, device)


def scale_factor_of(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64, seed: int = 0) -> float:
    """Return 1 / std of the latents `vae` samples for uint8 `images` [N, C, S, S]: the scale factor to save."""
    gen = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    zs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            post = vae.encode(uint8_to_float(images[i: i + batch_size]).to(device))
            zs.append(post.mean.float().cpu() + post.std.float().cpu() * torch.randn(post.mean.shape, generator=gen))
    return latent_scale_factor(torch.cat(zs))


def train_vae(cfg: VAETrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
              replace: bool = False) -> dict:
    """Train the KL autoencoder into run directory `out`; return a summary with held-out PSNR and SSIM.

    Writes config.toml, metrics.jsonl, loss.png, checkpoints/, model.safetensors + model.toml (the
    VAEConfig with the computed scale_factor) and reconstructions.png (held-out images over their
    reconstructions).
    """
    device = resolve_device(cfg.device)
    features = None
    if cfg.perceptual:
        from ..metrics.features import load_feature_network

        features = load_feature_network(cfg.perceptual).requires_grad_(False)
    kw = dict(image_size=cfg.image_size, label=None, n_crops=cfg.n_crops, seed=cfg.seed)
    train, test = (load_image_set(cfg.data, s, **kw) for s in ("train", "test"))
    x_tr = _limit(train.images, cfg.train_limit)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_channels=x_tr.shape[1]))
    out = start_run(out, cfg, resume=resume, replace=replace)
    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(cfg.model)
    dls = uint8_loaders((x_tr,), (test.images,), cfg.batch_size, seed=cfg.seed)
    augment = partial(random_flip, p=cfg.flip) if cfg.flip else None
    learn = _learner(cfg, model, dls, VAECB(cfg, features), device, out, progress, augment)
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    vae = learn.model.eval().float()
    scale = scale_factor_of(vae, x_tr, seed=cfg.seed)
    saved = dataclasses.replace(cfg.model, scale_factor=scale)
    save_component(out / MODEL, float32_state(vae), saved, "vae")
    x = uint8_to_float(test.images).to(device)
    with torch.no_grad():
        x_hat = torch.cat([vae.decode(vae.encode(x[i: i + 64]).mode()).float().clamp(-1, 1)
                           for i in range(0, len(x), 64)])
    save_grid(torch.cat([x[:16], x_hat[:16]]).cpu(), out / "reconstructions.png", nrow=16, scale=2)
    return _summary(learn, start, out, device, scale_factor=scale, test_psnr=float(psnr(x_hat, x).mean()),
                    test_ssim=float(ssim(x_hat, x).mean()), n_test=len(x))

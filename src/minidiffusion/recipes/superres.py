"""Super-resolution recipe (lesson 23): 64x64 targets from their 32x32 downscales, the course's progression.

Each training image x (a 64x64 photo crop, sprite or emoji) becomes the pair (degrade(x), x): shrunk to
32x32 (bicubic, antialiased) and enlarged back (bicubic), the network returns the 64x64 original
(`nn/superres.py`). Per image, TrivialAugment (`trivial_augment`) draws one op and applies it to input
and target alike (`TrivialAugment.pair`), then a flip; random erasing (`erase`) hits the input only, so
the network also learns to fill holes. The loss is the MSE of the pixels, plus with `perceptual` the MSE
of a classifier's activation maps (`perceptual_stages` stride-2 stages deep) times `perceptual_weight`
(the course: 1/10). With `encoder` the network's down path starts as that classifier's ResNet body
(its architecture is copied from the classifier), frozen for the first `freeze_epochs` epochs (weights and
BatchNorm statistics: `FreezeEncoderCB`) and trained with the rest afterwards.

The presets walk the progression on the held-out-photo split (data/photos.py): `photos-sr-ae` (plain
autoencoder), `photos-sr-unet` (skips, identity init), `photos-sr-perceptual` (+ perceptual loss),
`photos-sr-pretrained` (+ the sprites classifier as the encoder) and `photos-sr-cross` (+ cross convs, the
course's last model); the shipped upscaler `photos-sr2` is the U-Net on a fitted linear base
(`model.base="linear"`, `fit_base`) with back-projection and the log-MSE loss. Validation reports the loss,
the PSNR of the network's output and of the bicubic input on the same held-out crops.

Beyond the course, `photos-sr-diffusion` (`SuperResDiffusionTrainConfig`, recipe "superres_diffusion") learns
the same task as conditional diffusion: the EDM loss of a U-Net that denoises the residual x - degrade(x)
with degrade(x) as its `image_cond` (same pairs, same augmentation); validation reports that loss (sampling
is left to the final scoring, which runs the sampler through `Upscaler`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import check_choice, check_number, to_dict
from ..data.augment import random_erase
from ..data.images import save_labelled_grid, uint8_to_float
from ..data.loaders import uint8_loaders
from ..data.trivial_augment import TrivialAugment
from ..device import check_precision, resolve_device
from ..diffusion.config import build_objective
from ..errors import ConfigError
from ..learner import Callback, Learner
from ..learner.callbacks import MetricsCB
from ..learner.checkpoint import CheckpointCB
from ..learner.device import DeviceCB
from ..learner.nan_guard import NaNGuardCB
from ..learner.precision import precision_callback, precision_of
from ..learner.progress import ProgressCB
from ..learner.schedules import OneCycleCB
from ..learner.time_budget import TimeBudgetCB
from ..metrics.image_quality import psnr
from ..nn.resnet import ResNet
from ..nn.superres import (
    FeatureMaps,
    SuperResConfig,
    SuperResNet,
    degrade,
    downscale,
    encoder_config_of,
    fit_linear_upsampler,
)
from ..pipelines.superres import DiffusionSRConfig, Upscaler, build_upscaler_net, evaluate_upscaler_on, save_upscaler
from ..runs import MODEL
from .common import fit_epochs, is_main, start_run, training_cbs

__all__ = ["SuperResTrainConfig", "SuperResDiffusionTrainConfig", "SuperResCB", "FreezeEncoderCB", "load_classifier",
           "superres_data", "superres_learner", "fit_base", "heldout_loss", "train_superres", "log_mse",
           "log_mse_weights", "EVAL_N"]

SR_SETS = ("photos", "sprites", "emoji")
SR_LOSSES = ("mse", "log_mse")
LOG_MSE_FLOOR = 4e-6  # the MSE of a 60 dB image in [-1, 1]: a log_mse loss stops asking for more there
EVAL_N = 512  # held-out images a run is scored on at the end, by default


@dataclass
class SuperResTrainConfig:
    """A super-resolution run: the network (`model`), its data, the loss, the pretrained encoder, optimisation."""

    recipe: ClassVar[str] = "superres"

    model: SuperResConfig = field(default_factory=SuperResConfig)
    data: str = "photos"  # photos (held-out photos for validation) | sprites | emoji
    image_size: int = 64  # target side; the input is this / model.scale, upscaled back
    n_crops: int = 4096  # photos: training crops (held-out crops: a quarter as many)
    valid_limit: int = 512  # held-out images validated on each epoch (0: all)
    eval_n: int = EVAL_N  # held-out images the finished run is scored on (`minidiffusion eval RUN --n 512` repeats it)
    train_limit: int = 0
    perceptual: str = ""  # a classifier (shipped name, run dir or .safetensors): add the MSE of its maps
    perceptual_weight: float = 0.1
    perceptual_stages: int = 2  # how deep its maps are taken: stride-2 stages (0: the whole body)
    encoder: str = ""  # a classifier whose ResNet body becomes the down path (architecture copied from it)
    freeze_epochs: int = 1  # with `encoder`: epochs it stays frozen (weights and BatchNorm statistics)
    base_fit_n: int = 2048  # with model.base="linear": training images its least-squares fit uses (0: all)
    loss: str = "mse"  # mse | log_mse (the mean over images of log(MSE + 4e-6): what the mean of per-image PSNRs asks)
    trivial_augment: bool = True  # one random op per image on input and target alike
    flip: float = 0.5
    erase: float = 0.0  # random-erasing probability, on the input only
    epochs: int = 5
    minutes: float = 0.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-5
    precision: str = "fp32"  # auto | bf16 | fp16 | fp32 (fp32 + channels_last was the fastest on our CPU)
    channels_last: bool = True
    seed: int = 0
    sync_bn: bool = True  # under torchrun: batch norms use the global batch's statistics (as one process)
    device: str = "auto"

    def __post_init__(self):
        check_choice("data", self.data, SR_SETS)
        check_number("image_size", self.image_size, lo=8, hi=1024, integer=True)
        if self.image_size % self.model.size_factor:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the network's size factor "
                              f"{self.model.size_factor} (2 ^ its stages)")
        check_number("n_crops", self.n_crops, lo=1, hi=1_000_000, integer=True)
        check_number("valid_limit", self.valid_limit, lo=0, integer=True)
        check_number("eval_n", self.eval_n, lo=1, hi=100_000, integer=True)
        check_number("train_limit", self.train_limit, lo=0, integer=True)
        check_choice("loss", self.loss, SR_LOSSES)
        check_number("base_fit_n", self.base_fit_n, lo=0, integer=True)
        check_number("perceptual_weight", self.perceptual_weight, lo=0.0, hi=1e6)
        check_number("perceptual_stages", self.perceptual_stages, lo=0, hi=16, integer=True)
        check_number("freeze_epochs", self.freeze_epochs, lo=0, hi=100_000, integer=True)
        check_number("flip", self.flip, lo=0.0, hi=1.0)
        check_number("erase", self.erase, lo=0.0, hi=1.0)
        check_number("epochs", self.epochs, lo=1, hi=100_000, integer=True)
        check_number("minutes", self.minutes, lo=0.0, hi=100_000.0)
        check_number("batch_size", self.batch_size, lo=1, hi=65_536, integer=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=10.0)
        check_number("weight_decay", self.weight_decay, lo=0.0, hi=10.0)
        check_number("seed", self.seed, lo=0, hi=2**63 - 1, integer=True)
        check_precision(self.precision)


@dataclass
class SuperResDiffusionTrainConfig(SuperResTrainConfig):
    """Super-resolution as conditional diffusion: `model` is a `DiffusionSRConfig` (U-Net + EDM objective + how it
    samples); data, augmentation and optimisation as `SuperResTrainConfig` (no perceptual loss, no encoder)."""

    recipe: ClassVar[str] = "superres_diffusion"

    model: DiffusionSRConfig = field(default_factory=DiffusionSRConfig)
    eval_n: int = 128  # sampling is slower than one forward pass: fewer held-out images scored at the end
    lr: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if self.perceptual or self.encoder:
            raise ConfigError("diffusion super-resolution trains on the diffusion loss alone: drop perceptual= and "
                              "encoder=")


def load_classifier(name: str) -> ResNet:
    """Return a trained ResNet classifier (float32, CPU, eval): a shipped name (assets/NAME.safetensors, e.g.
    sprites-classifier), a classifier run directory or its .safetensors file."""
    from ..metrics.features import load_feature_network

    shipped = resources.files("minidiffusion.assets") / f"{name}.safetensors"
    path = Path(str(shipped)) if "/" not in name and shipped.is_file() else Path(name)
    return load_feature_network(path, allow_unusual=True).model


def superres_data(cfg: SuperResTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (training images, held-out images): uint8 [N, 3, S, S] in 0..255, S = cfg.image_size."""
    if cfg.data == "sprites":
        from ..data.sprites import load_sprites

        train, test = (load_sprites(s, image_size=cfg.image_size).images for s in ("train", "test"))
    else:
        from ..data.sets import load_image_set

        kw = dict(image_size=cfg.image_size, label=None, n_crops=cfg.n_crops, seed=cfg.seed)
        train, test = (load_image_set(cfg.data, s, **kw).images for s in ("train", "test"))
    train = train[: cfg.train_limit] if cfg.train_limit else train
    test = test[: cfg.valid_limit] if cfg.valid_limit else test
    return train.contiguous(), test.contiguous()


def log_mse(pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return the mean over images of ln(MSE_i + LOG_MSE_FLOOR) for images [B, C, H, W] (a scalar): minus the mean
    per-image PSNR times ln(10) / 10, plus a constant, so a nearly exact image's error counts as much as a
    detailed image's (plain MSE lets the detailed images dominate)."""
    return torch.log(_image_mse(pred, x) + LOG_MSE_FLOOR).mean()


def _image_mse(pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return each image's mean squared error [B] between images [B, C, H, W]."""
    return (pred - x).pow(2).flatten(1).mean(1)


def log_mse_weights(pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return [B] weights 1 / (MSE_i + LOG_MSE_FLOOR): near `pred`, log_mse weighs image i's squared error by
    them (its derivative in MSE_i), so a weighted least squares from `pred` moves the way log_mse asks."""
    return 1 / (_image_mse(pred, x) + LOG_MSE_FLOOR)


class SuperResCB(Callback):
    """The super-resolution stages: the (input, target) pair from each target batch, augmented in training;
    loss = MSE, or `log_mse` with loss="log_mse" (+ perceptual_weight x MSE of `features`' maps). Validation also
    records `psnr` (network output vs target, dB) and `psnr_bicubic` (its bicubic input vs target): the improvement
    is their difference."""

    order = 10

    def __init__(self, cfg: SuperResTrainConfig, features: FeatureMaps | None = None,
                 generator: torch.Generator | None = None):
        self.cfg, self.features = cfg, features
        self.augment = TrivialAugment(pad=0, flip=cfg.flip, generator=generator) if cfg.trivial_augment else None
        self.generator = generator
        self.objective = build_objective(cfg.model.objective_config()) if isinstance(cfg.model, DiffusionSRConfig) \
            else None
        self._valid_gen = None

    def before_fit(self, learn) -> None:
        if self.features is not None:
            self.features.to(next(learn.model.parameters()).device)

    def pair(self, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (network input, target) for targets x [B, C, S, S] in [-1, 1]; both [B, C, S, S] in [-1, 1]."""
        inp = degrade(x, self.cfg.model.scale)
        if not training:
            return inp, x
        if self.augment is not None:
            inp, x = self.augment.pair([inp, x])
        elif self.cfg.flip:
            flip = (torch.rand(len(x), generator=self.generator) < self.cfg.flip).to(x.device).view(-1, 1, 1, 1)
            inp, x = torch.where(flip, inp.flip(-1), inp), torch.where(flip, x.flip(-1), x)
        if self.cfg.erase:
            inp = random_erase(inp, self.cfg.erase, generator=self.generator)
        return inp, x

    def before_epoch(self, learn) -> None:
        if self.objective is not None and not learn.training:  # the same noise every validation: comparable losses
            self._valid_gen = torch.Generator(next(learn.model.parameters()).device).manual_seed(self.cfg.seed + 12345)
        else:
            self._valid_gen = None

    def diffusion_loss(self, model, inp: torch.Tensor, x: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Return the EDM loss of `model` on the residuals x - inp, conditioned on inp (both [B, C, S, S]); noise
        from `generator` (None: the global RNG)."""
        return self.objective.loss(model, x - inp, generator=generator, image_cond=inp)

    def regression_loss(self, pred: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return (the loss, its parts {mse, perceptual when used}) of predictions `pred` for targets `x` (both
        [B, C, S, S], float)."""
        parts = {"mse": F.mse_loss(pred, x)}
        loss = parts["mse"] if self.cfg.loss == "mse" else log_mse(pred, x)
        if self.features is not None and self.cfg.perceptual_weight > 0:
            with torch.autocast(x.device.type, enabled=False):
                f_hat = self.features(pred)
                with torch.no_grad():
                    f = self.features(x)
            parts["perceptual"] = F.mse_loss(f_hat, f)
            loss = loss + self.cfg.perceptual_weight * parts["perceptual"]
        return loss, parts

    def predict(self, learn) -> None:
        inp, x = self.pair(learn.batch[0], learn.training)
        if self.objective is not None:
            loss = self.diffusion_loss(learn.model, inp, x, self._valid_gen)
            parts = {"diffusion": loss}
            if not learn.training:
                parts["psnr_bicubic"] = psnr(inp, x).mean()
            learn.preds, learn.loss, learn.loss_parts = None, loss, parts
            return
        pred = learn.model(inp).float()
        loss, parts = self.regression_loss(pred, x)
        if not learn.training:
            parts["psnr"] = psnr(pred.detach().clamp(-1, 1), x).mean()
            parts["psnr_bicubic"] = psnr(inp, x).mean()
        learn.preds, learn.loss, learn.loss_parts = pred, loss, parts

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction


class FreezeEncoderCB(Callback):
    """Keep `model.encoder` frozen for the first `epochs` epochs: no gradients (so the optimizer leaves its weights
    alone) and eval mode (so BatchNorm running statistics stay the pretrained ones); trainable afterwards."""

    order = -20

    def __init__(self, epochs: int = 1):
        self.epochs = epochs

    def before_epoch(self, learn) -> None:
        frozen = learn.epoch < self.epochs
        learn.model.encoder.requires_grad_(not frozen)
        if frozen:
            learn.model.encoder.eval()

    def after_fit(self, learn) -> None:
        learn.model.encoder.requires_grad_(True)


def _build_model(cfg: SuperResTrainConfig) -> tuple[SuperResTrainConfig, torch.nn.Module]:
    """The network, its down path taken from `cfg.encoder` when set (the config's encoder fields copied from it)."""
    if not cfg.encoder:
        return cfg, build_upscaler_net(cfg.model)
    clf = load_classifier(cfg.encoder)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **encoder_config_of(clf.cfg)))
    net = SuperResNet(cfg.model)
    net.load_encoder(clf.state_dict(), f"classifier {cfg.encoder}")
    return cfg, net


def fit_base(model: torch.nn.Module, cfg: SuperResTrainConfig, train: torch.Tensor) -> float | None:
    """Fit a linear-base network's `LinearUpsampler` (model.base="linear") by least squares on the first
    `base_fit_n` training images `train` (uint8 [N, C, S, S]), each image weighted as the loss weighs it (log_mse:
    1 / (its bicubic MSE + the 60 dB floor)); return the fit's weighted MSE, or None for a network without one."""
    base = getattr(model, "base", None)
    if base is None:
        return None
    x = uint8_to_float(train[: cfg.base_fit_n or len(train)])
    inp = degrade(x, cfg.model.scale)
    weights = log_mse_weights(inp, x) if cfg.loss == "log_mse" else None
    return fit_linear_upsampler(base, inp, x, weights)


def superres_learner(cfg: SuperResTrainConfig, out: str | Path | None = None, progress: bool = True,
                     data: tuple[torch.Tensor, torch.Tensor] | None = None, fit: bool = True) -> Learner:
    """Return a Learner that trains `cfg`'s network on `data` (default `superres_data(cfg)`), checkpointing into
    `out` when given. Its model is a SuperResNet; `learn.sr_config` is the config with the encoder's fields
    resolved (what to save). A linear base is fitted first (`fit_base`) unless `fit` is False (a resumed run
    loads it from its checkpoint)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cfg, model = _build_model(cfg)
    train, test = data if data is not None else superres_data(cfg)
    if fit:
        fit_base(model, cfg, train)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    features = None
    if cfg.perceptual:
        features = FeatureMaps(load_classifier(cfg.perceptual), cfg.perceptual_stages)
    dls = uint8_loaders((train,), (test,), cfg.batch_size, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sched = TimeBudgetCB(cfg.minutes, cfg.lr) if cfg.minutes > 0 else OneCycleCB(cfg.lr)
    cbs = [DeviceCB(device), SuperResCB(cfg, features, gen), MetricsCB(), NaNGuardCB(), ProgressCB(show=progress),
           sched, *training_cbs(cfg.seed, cfg.sync_bn)]
    if cfg.encoder and cfg.freeze_epochs:
        cbs.append(FreezeEncoderCB(cfg.freeze_epochs))
    _, mp = precision_callback(cfg.precision, device)
    cbs += [mp] if mp else []
    if out is not None:
        cbs.append(CheckpointCB(config=to_dict(cfg)))
    opt = partial(torch.optim.AdamW, eps=1e-5, weight_decay=cfg.weight_decay)
    learn = Learner(model, dls, lr=cfg.lr, cbs=cbs, opt_func=opt, path=out)
    learn.sr_config = cfg
    return learn


@torch.no_grad()
def heldout_loss(learn: Learner) -> dict:
    """Return the training loss and its parts (mse, perceptual, psnr, psnr_bicubic: means over images) of
    `learn.model` in eval mode on the validation loader: the progression's validation loss, computed even when
    a time budget ended training before a validation phase."""
    cb, model = learn.cb(SuperResCB), learn.model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    gen = torch.Generator(device).manual_seed(cb.cfg.seed + 12345)  # a diffusion loss's noise: the same every call
    for (x,) in learn.dls.valid:
        inp, x = cb.pair(x.to(device), training=False)
        parts = {"psnr_bicubic": psnr(inp, x).mean()}
        if cb.objective is not None:
            parts["loss"] = cb.diffusion_loss(model, inp, x, gen)
        else:
            pred = model(inp.contiguous(memory_format=torch.channels_last)).float()
            parts["loss"], more = cb.regression_loss(pred, x)
            parts.update(more)
            parts["psnr"] = psnr(pred.clamp(-1, 1), x).mean()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(x)
        n += len(x)
    return {k: round(v / n, 6) for k, v in sums.items()}


def train_superres(cfg: SuperResTrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
                   replace: bool = False) -> dict:
    """Train an upscaler into run directory `out`; return a summary: the last epoch's losses, held-out PSNR/SSIM of
    the network and of bicubic upscaling on `eval_n` held-out images (`evaluate_upscaler_on`), time and size.
    `valid_loss` is `heldout_loss` after training (the loss on the validation loader, in eval mode).

    Writes config.toml, metrics.jsonl, checkpoints/, model.safetensors + model.toml (kind "superres": loads with
    `Upscaler.from_run` and `minidiffusion upscale --run`) and samples.png (held-out crops: bicubic | network |
    original).
    """
    out = start_run(out, cfg, resume=resume, replace=replace)
    data = superres_data(cfg)
    learn = superres_learner(cfg, out, progress, data, fit=not resume)
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    seconds = round(time.time() - start, 1)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    net = learn.model.eval().float()
    save_upscaler(net, learn.sr_config.model, out / MODEL)
    device = next(net.parameters()).device
    heldout = heldout_loss(learn)
    up = Upscaler(net, learn.sr_config.model, device)
    scores = evaluate_upscaler_on(up, cfg.data, n=cfg.eval_n, image_size=cfg.image_size)
    scores["eval_seconds"] = scores.pop("seconds")
    x = uint8_to_float(data[1])
    low = downscale(x[:8], cfg.model.scale)
    bicubic, ours = up.bicubic(low), up.upscale_batch(low)
    save_labelled_grid(torch.cat([bicubic, ours, x[:8]]), ["bicubic", "network", "original"], out / "samples.png")
    metrics = learn.cb(MetricsCB)
    train, valid = metrics.latest("train") or {}, metrics.latest("valid") or {}
    return {"train_loss": train.get("loss"), "valid_loss": heldout["loss"], "valid_mse": heldout.get("mse"),
            "valid_perceptual": heldout.get("perceptual"), "last_valid_phase_loss": valid.get("loss"),
            "epochs": train.get("epoch", -1) + 1, "steps": learn.step, "seconds": seconds,
            "precision": precision_of(learn), "params": sum(p.numel() for p in net.parameters()),
            "device": str(device), "run_dir": str(out), **scores}

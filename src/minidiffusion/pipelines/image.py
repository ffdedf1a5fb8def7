"""A trained image diffusion model, ready to sample: network + objective + config + class names (+ a VAE).

`DiffusionModel.from_run(dir)` loads a run directory's `model.safetensors` (EMA weights) and
`model.toml`; `from_pretrained("fmnist")` loads a model shipped in `assets/`. `sample` turns
noise into images in [-1, 1] with any registered sampler, optional labels and classifier-free
guidance; `progression` records what the model predicts at each step. A *latent* diffusion model
is the same thing whose run directory also holds the autoencoder (`vae.safetensors` + `vae.toml`,
or a diffusers folder `vae/`): the sampler works on scaled latents and the VAE decodes the result
(and each preview) into images. Inference only: nothing here imports the Learner or the recipes.

What a saved diffusion model means is `DiffusionModelConfig`: the objective and its constants
(`ObjectiveConfig`), the U-Net's architecture, the image size and the default sampling settings.
The training config (recipes/diffusion.py) extends it with everything training needs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..artifacts import classes_metadata, component_kind, config_from_file, load_state, read_component, save_component
from ..config import check_choice, check_number
from ..data.images import save_grid, save_labelled_grid
from ..device import check_precision, with_autocast
from ..diffusion.config import ObjectiveConfig, build_objective
from ..diffusion.guidance import cfg_denoiser
from ..diffusion.samplers import SAMPLERS, get_sampler, nfe
from ..diffusion.schedules import SCHEDULES, schedule_for_budget
from ..errors import CheckpointError, ConfigError
from ..nn.unet import UNet, UNetConfig
from ..paths import float32_state

__all__ = ["DiffusionModelConfig", "DiffusionModel", "save_model", "model_config", "check_sampling", "MAX_STEPS",
           "MAX_SAMPLES", "shipped_models"]

MAX_STEPS = 1000  # sampling steps: DDPM's own schedule has 1000 timesteps; no sampler needs more
MAX_SAMPLES = 100_000  # images per call (they are held in memory: 100k 1x32x32 floats are 400 MB)
MAX_GUIDANCE = 100.0
KIND = "diffusion"
# Keys that model.toml files written before the training config was split from the model config
# carry (they describe how the model was trained, not what it means): dropped when such a file is
# read. A fixed, historical list: files written now hold only DiffusionModelConfig's keys.
_LEGACY_TRAINING_KEYS = frozenset({
    "channels", "train_limit", "conditional", "cond_drop", "epochs", "minutes", "batch_size", "lr",
    "weight_decay", "ema_decay", "precision", "compile", "seed", "device", "fid_every", "fid_n"})


@dataclass
class DiffusionModelConfig(ObjectiveConfig):
    """What defines a trained image diffusion model: objective (inherited), network, image size, sampling defaults."""

    model: UNetConfig = field(default_factory=UNetConfig)
    data: str = "fashion-mnist"  # what it was trained on (the reference set `eval` scores against)
    image_size: int = 32  # height = width of what the network sees (for a latent model: the latents)
    channels_last: bool = True  # the memory format the network runs in
    sampler: str = "dpmpp_2m"  # defaults for `sample` and the end-of-training grid
    steps: int = 20
    guidance: float = 1.0
    # clamp every x0 estimate to [-1, 1] while sampling (pixel models only): what the course's DDIM and diffusers'
    # `clip_sample` (on by default in its DDPM/DDIM schedulers) do; an eps-predicting network needs it at 128x128
    clip_sample: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.clip_sample, bool):
            raise ConfigError(f"clip_sample must be true or false, got {self.clip_sample!r}")
        check_number("image_size", self.image_size, lo=1, hi=4096, integer=True)
        if self.image_size % self.model.size_factor:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of {self.model.size_factor}, which "
                              f"the U-Net's {len(self.model.channels)} levels need; use e.g. image_size="
                              f"{max(1, round(self.image_size / self.model.size_factor)) * self.model.size_factor}")
        check_sampling(self.sampler, self.steps, self.guidance)


def check_sampling(sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                   n: int | None = None, seed: int | None = None) -> None:
    """Raise ConfigError unless each given sampling setting is in its allowed range (None: not given)."""
    if sampler is not None:
        check_choice("sampler", sampler, SAMPLERS)
    if steps is not None:
        check_number("steps", steps, lo=1, hi=MAX_STEPS, integer=True)
    if guidance is not None:
        check_number("guidance", guidance, lo=0.0, hi=MAX_GUIDANCE)
    if n is not None:
        check_number("n", n, lo=1, hi=MAX_SAMPLES, integer=True)
    if seed is not None:
        check_number("seed", seed, lo=0, hi=2**63 - 1, integer=True)


def _clamped(den: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Return the denoiser whose x0 estimates are clamped to [-1, 1] (`clip_sample`)."""
    return lambda x, sigma, **kw: den(x, sigma, **kw).clamp(-1, 1)


def model_config(cfg) -> DiffusionModelConfig:
    """Return the DiffusionModelConfig part of `cfg` (a DiffusionModelConfig or a config extending it)."""
    return DiffusionModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(DiffusionModelConfig)})


def save_model(net: torch.nn.Module, cfg, class_names: Sequence[str] | None, path: str | Path) -> Path:
    """Write the network's weights (float32) as `path` (.safetensors) + its DiffusionModelConfig beside it
    (.toml), the class names in the metadata; return the weights path."""
    return save_component(path, float32_state(net), model_config(cfg), KIND, classes_metadata(class_names))


def shipped_models() -> list[str]:
    """Return the names of the diffusion models shipped in assets/ (for --pretrained)."""
    return sorted(p.name[: -len(".safetensors")] for p in resources.files("minidiffusion.assets").iterdir()
                  if p.name.endswith(".safetensors") and component_kind(p) == KIND)


class DiffusionModel:
    """A trained denoising network with its objective: `sample(...)` returns images in [-1, 1]."""

    def __init__(self, net: torch.nn.Module, cfg: DiffusionModelConfig, class_names: Sequence[str] | None = None,
                 device: torch.device | str = "cpu", vae: torch.nn.Module | None = None):
        fmt = torch.channels_last if getattr(cfg, "channels_last", False) else torch.contiguous_format
        self.net, self.cfg = net.eval().to(device, memory_format=fmt), cfg  # sample as it trained
        self.device = torch.device(device)
        self.class_names = list(class_names or [])
        self.objective = build_objective(cfg)
        self.vae = vae.eval().to(self.device) if vae is not None else None

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Return what the sampler made as images in [-1, 1]: x itself, or the VAE's decoding of latents x."""
        if self.vae is None:
            return x.float().clamp(-1, 1)
        with torch.no_grad():
            return self.vae.decode_latents(x.float()).float().clamp(-1, 1)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, weights: str | Path, config: str | Path | None = None,
                  device: torch.device | str = "cpu", net: torch.nn.Module | None = None) -> DiffusionModel:
        """Load weights (.safetensors) and their config (.toml, default: next to the weights) into
        `net` (default: our UNet built from the config; pass another architecture's empty network)."""
        comp = read_component(weights, kind=KIND, config=config)
        d = {k: v for k, v in comp.config.items() if k not in _LEGACY_TRAINING_KEYS}
        cfg = config_from_file(DiffusionModelConfig, d, comp.config_path)
        try:
            classes = json.loads(comp.metadata.get("classes", "[]"))
        except json.JSONDecodeError:
            raise CheckpointError(f"{comp.weights} has damaged metadata (classes is not JSON); save it again") from None
        net = net if net is not None else UNet(cfg.model)
        load_state(net, comp.tensors, f"{comp.weights} (with its config {comp.config_path})")
        return cls(net, cfg, classes, device)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | str = "cpu") -> DiffusionModel:
        """Load `run_dir/model.safetensors` (written at the end of `minidiffusion train`)."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            what = "is a file" if run_dir.exists() else "does not exist"
            raise CheckpointError(f"{run_dir} {what}: it is no run directory with a model.safetensors; give the "
                                  "--out folder of `minidiffusion train`, or --pretrained NAME")
        if not (run_dir / "model.safetensors").is_file():
            raise CheckpointError(f"{run_dir} holds no model.safetensors: train it first "
                                  "(`minidiffusion train PRESET --out DIR`) or let an interrupted run finish "
                                  "with --resume")
        model = cls.from_file(run_dir / "model.safetensors", device=device)
        if (run_dir / "vae.safetensors").is_file() or (run_dir / "vae" / "config.json").is_file():
            from .autoencoder import load_autoencoder

            vae_path = run_dir / "vae.safetensors" if (run_dir / "vae.safetensors").is_file() else run_dir / "vae"
            model.vae = load_autoencoder(vae_path, device=model.device)
        return model

    @classmethod
    def from_pretrained(cls, name: str = "fmnist", device: torch.device | str = "cpu") -> DiffusionModel:
        """Load a model shipped with the package (assets/NAME.safetensors)."""
        if name not in shipped_models():
            raise ConfigError(f"no pretrained model {name!r}; shipped: {', '.join(shipped_models()) or 'none'}")
        res = resources.files("minidiffusion.assets") / f"{name}.safetensors"
        with resources.as_file(res) as path:
            return cls.from_file(path, device=device)

    # -- sampling ------------------------------------------------------------------------------
    def label_ids(self, labels: Sequence[str | int] | None, n: int) -> torch.Tensor | None:
        """Return class indices [n] for `labels` (names or ints, repeated to n), balanced when None."""
        if not self.cfg.model.n_classes:
            if labels:
                raise ConfigError("this model is unconditional; drop --label")
            return None
        k = self.cfg.model.n_classes
        if not labels:
            return torch.arange(n) % k
        ids = []
        lower = [c.lower() for c in self.class_names]
        parts = [[p.strip() for p in re.split(r"[/&]", c)] for c in lower]  # "T-shirt/top", "Food & Drink"
        for lab in labels:
            if isinstance(lab, int) or str(lab).isdigit():
                idx = int(lab)
            else:
                key = str(lab).strip().lower()
                matches = [i for i, c in enumerate(lower) if key and c == key] or \
                          [i for i, p in enumerate(parts) if key and key in p]
                if not matches:
                    raise ConfigError(f"unknown label {lab!r}; choose one of {', '.join(self.class_names)} "
                                      f"or an index 0..{k - 1}")
                idx = matches[0]
            if not 0 <= idx < k:
                raise ConfigError(f"label index {idx} is out of range; choose 0..{k - 1}")
            ids.append(idx)
        return torch.tensor([ids[i % len(ids)] for i in range(n)])

    def denoiser(self, labels: torch.Tensor | None = None, guidance: float = 1.0,
                 precision: str = "fp32") -> Callable[..., torch.Tensor]:
        """Return D(x, sigma) -> x0_hat (float32, data units) for `labels` with classifier-free guidance
        `guidance` (1 = none); `precision` "bf16"/"fp16"/"auto" runs the network under autocast. With the
        config's `clip_sample` each estimate (after guidance) is clamped to [-1, 1]."""
        check_precision(precision)
        base = with_autocast(self.objective.denoiser(self.net), self.device, precision)
        if labels is None:
            den = base
        else:
            labels = labels.to(self.device)
            null = torch.full_like(labels, self.cfg.model.n_classes)
            den = ((lambda x, sigma: base(x, sigma, label=labels)) if guidance == 1.0
                   else cfg_denoiser(base, {"label": labels}, {"label": null}, guidance))
        if not self.cfg.clip_sample:
            return den
        if self.vae is not None:
            raise ConfigError("clip_sample clamps pixel estimates to [-1, 1], but this model samples latents "
                              "(it has a VAE); set clip_sample = false in its model.toml")
        return _clamped(den)

    def settings(self, sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None) -> tuple[str, int, float]:
        """Return (sampler, steps, guidance) with the model's defaults for what is None, each checked."""
        sampler = self.cfg.sampler if sampler is None else sampler
        steps = self.cfg.steps if steps is None else steps
        guidance = self.cfg.guidance if guidance is None else guidance
        check_sampling(sampler, steps, guidance)
        only = getattr(self.objective, "samplers", None)
        if only is not None and sampler not in only:
            raise ConfigError(f"this {self.objective.name} model samples only with {', '.join(only)}, not {sampler}; "
                              f"drop --sampler (its default is {self.cfg.sampler})")
        return sampler, steps, guidance

    @torch.no_grad()
    def sample(self, n: int = 16, sampler: str | None = None, steps: int | None = None,
               labels: Sequence[str | int] | None = None, guidance: float | None = None, seed: int = 0,
               callback=None, batch_size: int = 500, precision: str = "fp32",
               steer: Callable | None = None, schedule: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (images [n, C, H, W] in [-1, 1] on the CPU, label ids [n] or None).

        Defaults come from the model's config (sampler, steps, guidance). Same seed, same images.
        `precision` "bf16"/"fp16" (or "auto": bf16 where it is fast) runs only the network under
        autocast; the sampler's arithmetic stays float32. `steer(denoiser, label_ids) -> denoiser`
        wraps the denoiser of each batch (gradient guidance, pipelines/steering.py). `schedule`
        picks the sigmas (`sigmas`). Out-of-range settings raise ConfigError.
        """
        sampler, steps, guidance = self.settings(sampler, steps, guidance)
        check_sampling(n=n, seed=seed)
        check_number("batch_size", batch_size, lo=1, integer=True)
        check_precision(precision)
        fn = get_sampler(sampler)
        ids = self.label_ids(labels, n)
        sigmas = self.sigmas(steps, sampler, schedule)
        c, s = self.cfg.model.in_channels, self.cfg.image_size
        gen = torch.Generator(self.device).manual_seed(seed)
        out = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            x = torch.randn(m, c, s, s, generator=gen, device=self.device) * float(sigmas[0])
            den = self.denoiser(None if ids is None else ids[i: i + m], guidance, precision)
            if steer is not None:
                den = steer(den, None if ids is None else ids[i: i + m])
                if self.cfg.clip_sample:  # the steered estimate is clamped too, not only what the scorer saw
                    den = _clamped(den)
            out.append(self.to_images(fn(den, x, sigmas, generator=gen, callback=callback)).cpu())
        return torch.cat(out), ids

    def sigmas(self, steps: int, sampler: str, schedule: str | None = None) -> torch.Tensor:
        """Return the steps + 1 sampling sigmas, descending to 0 (float64): the objective's own grid when
        `schedule` is None (Karras' rho = 7; DDPM's timesteps for ddpm/ddim on a DDPM model), else
        "karras", "exponential" (uniform in log sigma), "cosine", or "auto" (`schedule_for_budget`)
        over the model's sigma range."""
        if schedule is None:
            return self.objective.sampling_sigmas(steps, sampler)
        check_choice("schedule", schedule, (*SCHEDULES, "auto"))
        if getattr(self.objective, "samplers", None) is not None:
            raise ConfigError(f"a {self.objective.name} model samples on its own grid; drop the schedule ({schedule})")
        if schedule == "auto":
            schedule = schedule_for_budget(sampler, nfe(sampler, steps))
        return SCHEDULES[schedule](steps, *self.objective.sigma_range())

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        """Return the number of network evaluations one sample costs with these settings."""
        sampler, steps, _ = self.settings(sampler, steps)
        return nfe(sampler, steps)

    def sample_grid(self, path: str | Path, per_class: int = 8, seed: int = 0, **kw) -> Path:
        """Write a PNG grid (a labelled row per class for conditional models); return the path."""
        k = self.cfg.model.n_classes
        if k:
            labels = [i for i in range(k) for _ in range(per_class)]
            x, _ = self.sample(len(labels), labels=labels, seed=seed, **kw)
            names = self.class_names if len(self.class_names) == k else [str(i) for i in range(k)]
            return save_labelled_grid(x, names, path)
        x, _ = self.sample(64, seed=seed, **kw)
        return save_grid(x, path, nrow=8, scale=2)

    def trajectory(self, n: int = 4, frames: int = 8, seed: int = 0, **kw) -> torch.Tensor:
        """Return the predicted clean images (x0_hat) along the sampling trajectory, [n, k + 1, C, H, W] in
        [-1, 1]: at k = min(frames, steps) steps evenly spread from the noisiest to the last, then the final
        sample. `kw` as `sample` (sampler, steps, labels, guidance, schedule, ...)."""
        _, steps, _ = self.settings(kw.get("sampler"), kw.get("steps"), kw.get("guidance"))
        check_number("frames", frames, lo=1, integer=True)
        keep = set(torch.linspace(0, steps - 1, min(frames, steps)).round().long().tolist())
        seen: list[torch.Tensor] = []

        def record(info):
            if info["i"] in keep:
                seen.append(self.to_images(info["denoised"]).cpu())

        x, _ = self.sample(n, seed=seed, callback=record, **kw)
        return torch.stack(seen + [x], dim=1)

    def progression(self, path: str | Path, n: int = 4, frames: int = 8, seed: int = 0, **kw) -> Path:
        """Write a PNG: a row per sample, the predicted clean image (x0_hat) at `frames` steps
        from the noisiest to the last, then the final image (`trajectory`); return the path."""
        cols = self.trajectory(n, frames, seed, **kw)
        return save_grid(cols.flatten(0, 1), path, nrow=cols.shape[1], scale=2)


"""A trained diffusion model, ready to sample: network + objective + config + class names.

`DiffusionModel.from_run(dir)` loads a run directory's `model.safetensors` (EMA weights) and
`config.toml`; `from_pretrained("fmnist")` loads the weights shipped in `assets/`. `sample`
turns noise into images in [-1, 1] with any registered sampler, optional labels and
classifier-free guidance; `progression` records what the model predicts at each step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import from_dict, load_preset, save_config
from ..data.images import save_grid, save_labelled_grid
from ..errors import CheckpointError, ConfigError
from ..nn.unet import UNet
from ..paths import float32_state, save_safetensors
from .guidance import cfg_denoiser
from .objectives import CosineObjective, DDPMObjective, Objective
from .samplers import get_sampler, nfe
from .schedules import sigma_from_alpha_bar, sigmas_ddpm, sigmas_karras

__all__ = ["DiffusionModel", "save_model", "sampling_sigmas", "sigma_range"]


def sigma_range(objective: Objective) -> tuple[float, float]:
    """Return (sigma_min, sigma_max) of the noise levels the objective trains on."""
    if isinstance(objective, DDPMObjective):
        s = sigma_from_alpha_bar(objective.alpha_bars)
        return float(s[0]), float(s[-1])
    if isinstance(objective, CosineObjective) and objective.min_alpha_bar > 0:
        m = objective.min_alpha_bar
        return 0.002, math.sqrt((1 - m) / m)
    return 0.002, 80.0


def sampling_sigmas(objective: Objective, sampler: str, steps: int) -> torch.Tensor:
    """Return steps+1 descending sigmas ending in 0: DDPM's own timesteps for ddpm/ddim on a DDPM
    model (as the course sampled), Karras et al.'s rho=7 schedule otherwise."""
    if isinstance(objective, DDPMObjective) and sampler in ("ddpm", "ddim"):
        return sigmas_ddpm(steps, objective.alpha_bars, spacing="trailing")
    lo, hi = sigma_range(objective)
    return sigmas_karras(steps, lo, hi)


def save_model(net: torch.nn.Module, cfg, class_names: Sequence[str] | None, path: str | Path) -> Path:
    """Write the network's weights (float32 safetensors) plus config.toml/classes next to it; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"classes": json.dumps(list(class_names or []))}
    save_safetensors(float32_state(net), path, metadata=meta)
    save_config(cfg, path.with_suffix(".toml"))
    return path


def _autocast(denoiser, device: torch.device, precision: str):
    """Return `denoiser` run under autocast for precision bf16/fp16 ("auto": bf16 where it is fast)."""
    from ..learner.precision import bf16_is_fast, check_precision

    if check_precision(precision) == "fp32" or (precision == "auto" and not bf16_is_fast(device)):
        return denoiser
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    def run(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return denoiser(x, sigma, **cond).float()

    return run


class DiffusionModel:
    """A trained denoising network with its objective: `sample(...)` returns images in [-1, 1]."""

    def __init__(self, net: torch.nn.Module, cfg, class_names: Sequence[str] | None = None,
                 device: torch.device | str = "cpu"):
        from .training import build_objective

        fmt = torch.channels_last if getattr(cfg, "channels_last", False) else torch.contiguous_format
        self.net, self.cfg = net.eval().to(device, memory_format=fmt), cfg  # sample as it trained
        self.device = torch.device(device)
        self.class_names = list(class_names or [])
        self.objective = build_objective(cfg)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, weights: str | Path, config: str | Path | None = None,
                  device: torch.device | str = "cpu", net: torch.nn.Module | None = None) -> DiffusionModel:
        """Load weights (.safetensors) and their config (.toml, default: next to the weights) into
        `net` (default: our UNet built from the config; pass another architecture's empty network)."""
        from .training import DiffusionConfig

        weights = Path(weights)
        if weights.suffix != ".safetensors":
            raise CheckpointError(f"{weights} is not a .safetensors file; only safetensors weights are loaded "
                                  "(pickled .pt/.pkl files can run arbitrary code)")
        config = Path(config) if config else weights.with_suffix(".toml")
        if not weights.is_file() or not config.is_file():
            raise CheckpointError(f"missing {weights if not weights.is_file() else config}; "
                                  "a trained model needs both model.safetensors and model.toml")
        cfg = from_dict(DiffusionConfig, load_preset(str(config)))
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            classes = json.loads((f.metadata() or {}).get("classes", "[]"))
        net = net if net is not None else UNet(cfg.model)
        state = load_file(str(weights))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{weights} does not match its config {config}: {str(e).splitlines()[0]}") from None
        return cls(net, cfg, classes, device)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | str = "cpu") -> DiffusionModel:
        """Load `run_dir/model.safetensors` (written at the end of `minidiffusion train`)."""
        run_dir = Path(run_dir)
        if not (run_dir / "model.safetensors").is_file():
            raise CheckpointError(f"{run_dir} holds no model.safetensors: train it first "
                                  "(`minidiffusion train PRESET --out DIR`) or let an interrupted run finish "
                                  "with --resume")
        return cls.from_file(run_dir / "model.safetensors", device=device)

    @classmethod
    def from_pretrained(cls, name: str = "fmnist", device: torch.device | str = "cpu") -> DiffusionModel:
        """Load a model shipped with the package (assets/NAME.safetensors)."""
        res = resources.files("minidiffusion.assets") / f"{name}.safetensors"
        if not res.is_file():
            shipped = sorted(p.name[:-12] for p in resources.files("minidiffusion.assets").iterdir()
                             if p.name.endswith(".safetensors") and not p.name.startswith("classifier"))
            raise ConfigError(f"no pretrained model {name!r}; shipped: {shipped or 'none'}")
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
        for lab in labels:
            if isinstance(lab, int) or str(lab).isdigit():
                idx = int(lab)
            else:
                key = str(lab).lower()
                matches = [i for i, c in enumerate(lower) if c == key or key in c.split("/")]
                if not matches:
                    raise ConfigError(f"unknown label {lab!r}; choose one of {self.class_names}")
                idx = matches[0]
            if not 0 <= idx < k:
                raise ConfigError(f"label index {idx} out of range 0..{k - 1}")
            ids.append(idx)
        return torch.tensor([ids[i % len(ids)] for i in range(n)])

    def denoiser(self, labels: torch.Tensor | None = None, guidance: float = 1.0, precision: str = "fp32"):
        """Return D(x, sigma) -> x0_hat (float32, data units) for `labels` with classifier-free guidance
        `guidance` (1 = none); `precision` "bf16"/"fp16"/"auto" runs the network under autocast."""
        base = _autocast(self.objective.denoiser(self.net), self.device, precision)
        if labels is None:
            return base
        labels = labels.to(self.device)
        null = torch.full_like(labels, self.cfg.model.n_classes)
        if guidance == 1.0:
            return lambda x, sigma: base(x, sigma, label=labels)
        return cfg_denoiser(base, {"label": labels}, {"label": null}, guidance)

    @torch.no_grad()
    def sample(self, n: int = 16, sampler: str | None = None, steps: int | None = None,
               labels: Sequence[str | int] | None = None, guidance: float | None = None, seed: int = 0,
               callback=None, batch_size: int = 500,
               precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (images [n, C, H, W] in [-1, 1] on the CPU, label ids [n] or None).

        Defaults come from the model's config (sampler, steps, guidance). Same seed, same images.
        `precision` "bf16"/"fp16" (or "auto": bf16 where it is fast) runs only the network under
        autocast; the sampler's arithmetic stays float32.
        """
        sampler = sampler or self.cfg.sampler
        steps = steps or self.cfg.steps
        guidance = self.cfg.guidance if guidance is None else guidance
        fn = get_sampler(sampler)
        ids = self.label_ids(labels, n)
        sigmas = sampling_sigmas(self.objective, sampler, steps)
        c, s = self.cfg.model.in_channels, self.cfg.image_size
        gen = torch.Generator(self.device).manual_seed(seed)
        out = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            x = torch.randn(m, c, s, s, generator=gen, device=self.device) * float(sigmas[0])
            den = self.denoiser(None if ids is None else ids[i: i + m], guidance, precision)
            out.append(fn(den, x, sigmas, generator=gen, callback=callback).float().clamp(-1, 1).cpu())
        return torch.cat(out), ids

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        """Return the number of network evaluations one sample costs with these settings."""
        return nfe(sampler or self.cfg.sampler, steps or self.cfg.steps)

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

    def progression(self, path: str | Path, n: int = 4, frames: int = 8, seed: int = 0, **kw) -> Path:
        """Write a PNG: a row per sample, the predicted clean image (x0_hat) at `frames` steps
        from the noisiest to the last, then the final image; return the path."""
        steps = kw.get("steps") or self.cfg.steps
        keep = set(torch.linspace(0, steps - 1, min(frames, steps)).round().long().tolist())
        seen: list[torch.Tensor] = []

        def record(info):
            if info["i"] in keep:
                seen.append(info["denoised"].float().clamp(-1, 1).cpu())

        x, _ = self.sample(n, seed=seed, callback=record, **kw)
        cols = torch.stack(seen + [x], dim=1)  # (n, frames + 1, C, H, W)
        return save_grid(cols.flatten(0, 1), path, nrow=cols.shape[1], scale=2)

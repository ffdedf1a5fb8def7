"""What defines a diffusion objective, as saved with every trained model: `ObjectiveConfig` -> `build_objective`.

Every number that changes what a trained network's output *means* lives here and is written into
the model's config (model.toml), so that changing a default later can never silently reinterpret
an old model. The defaults are the values models were trained with before they were saved
(time_scale = 1000 and min_alpha_bar = 1e-4 for the cosine objective; EDM's p_mean, p_std and
sampling range 0.002..80; DDPM's 1000 linear betas 1e-4..0.02), so old configs load unchanged.

Which fields matter depends on `objective`:

    ddpm    timesteps, beta_start, beta_end, beta_schedule
    cosine  prediction (eps | v), time_scale, min_alpha_bar, sigma_min (and sigma_max if min_alpha_bar = 0)
    edm     sigma_data, p_mean, p_std, sigma_min, sigma_max
    consistency  sigma_data, sigma_min (its boundary condition), sigma_max (a distilled model, samples in 1-4 steps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .objectives import CosineObjective, DDPMObjective, EDMObjective, Objective
from .schedules import alpha_bars_linear, alpha_bars_scaled_linear

__all__ = ["ObjectiveConfig", "build_objective", "OBJECTIVE_NAMES"]

OBJECTIVE_NAMES = ("ddpm", "cosine", "edm", "consistency")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@dataclass
class ObjectiveConfig:
    """The diffusion objective of a model and the constants that fix what its network predicts."""

    objective: str = "edm"  # ddpm | cosine | edm
    prediction: str = "v"  # cosine only: eps | v
    sigma_data: float = 0.5  # edm: std of the data (0.5 for images in [-1, 1])
    p_mean: float = -1.2  # edm: training sigmas are log-normal, ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    time_scale: float = 1000.0  # cosine: the network is told time_scale * t, t in [0, 1)
    min_alpha_bar: float = 1e-4  # cosine: abar(t) is clamped here, so t -> 1 stays finite
    sigma_min: float = 0.002  # edm, cosine: the lowest sigma sampling steps to (before 0)
    sigma_max: float = 80.0  # edm (and cosine with min_alpha_bar = 0): where sampling starts
    timesteps: int = 1000  # ddpm: discrete training timesteps T
    beta_start: float = 1e-4  # ddpm: betas from beta_start to beta_end
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # ddpm: linear | scaled_linear (Stable Diffusion's: linear in sqrt(beta))

    def __post_init__(self):
        _require(self.objective in OBJECTIVE_NAMES,
                 f"objective must be one of {', '.join(OBJECTIVE_NAMES)}, got {self.objective!r}")
        _require(self.prediction in ("eps", "v"), f"prediction must be eps or v, got {self.prediction!r}")
        _require(_finite(self.sigma_data, self.p_std) and self.sigma_data > 0 and self.p_std > 0,
                 f"sigma_data and p_std must be numbers > 0, got {self.sigma_data} and {self.p_std}")
        _require(_finite(self.p_mean), f"p_mean must be a finite number, got {self.p_mean}")
        _require(_finite(self.time_scale) and self.time_scale > 0,
                 f"time_scale must be a number > 0, got {self.time_scale}")
        _require(_finite(self.min_alpha_bar) and 0 <= self.min_alpha_bar < 1,
                 f"min_alpha_bar must be a number in [0, 1), got {self.min_alpha_bar}")
        _require(_finite(self.sigma_min, self.sigma_max) and 0 < self.sigma_min < self.sigma_max,
                 f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got {self.sigma_min} "
                 f"and {self.sigma_max}")
        _require(isinstance(self.timesteps, int) and 2 <= self.timesteps <= 100_000,
                 f"timesteps must be an integer in 2..100000, got {self.timesteps!r}")
        _require(_finite(self.beta_start, self.beta_end) and 0 < self.beta_start <= self.beta_end < 1,
                 f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")
        _require(self.beta_schedule in ("linear", "scaled_linear"),
                 f"beta_schedule must be linear or scaled_linear, got {self.beta_schedule!r}")

    def objective_config(self) -> ObjectiveConfig:
        """Return just the objective's fields as an `ObjectiveConfig` (configs that extend this one keep more)."""
        return ObjectiveConfig(**{k: getattr(self, k) for k in ObjectiveConfig.__dataclass_fields__})


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """Return the training objective `cfg` describes (any config extending ObjectiveConfig works)."""
    if cfg.objective == "cosine":
        return CosineObjective(prediction=cfg.prediction, time_scale=cfg.time_scale,
                               min_alpha_bar=cfg.min_alpha_bar, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    if cfg.objective == "edm":
        return EDMObjective(sigma_data=cfg.sigma_data, p_mean=cfg.p_mean, p_std=cfg.p_std,
                            sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    if cfg.objective == "consistency":
        from .consistency import ConsistencyObjective

        return ConsistencyObjective(sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    make = alpha_bars_scaled_linear if cfg.beta_schedule == "scaled_linear" else alpha_bars_linear
    return DDPMObjective(make(cfg.timesteps, cfg.beta_start, cfg.beta_end))

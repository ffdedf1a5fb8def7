"""Diffusion: schedules (sigmas), objectives (noisify + preconditioning -> denoisers), samplers, guidance.

Everything meets at one interface, a denoiser `D(x, sigma, **cond) -> x0_hat` in the
variance-exploding scaling x = x0 + sigma * eps (Karras et al. 2022); see docs/design.md.
This package is pure maths: it imports torch, numpy and minidiffusion.errors only.
"""
from .config import OBJECTIVE_NAMES, ObjectiveConfig, build_objective
from .guidance import cfg_denoiser
from .objectives import (
    OBJECTIVES,
    CosineObjective,
    DDPMObjective,
    EDMObjective,
    Objective,
    TrainingBatch,
    edm_scalings,
    get_objective,
)
from .samplers import SAMPLERS, get_sampler, nfe, steps_for_budget
from .schedules import (
    SCHEDULES,
    alpha_bar_cosine,
    alpha_bars_linear,
    schedule_for_budget,
    sigma_from_alpha_bar,
    sigmas_cosine,
    sigmas_ddpm,
    sigmas_exponential,
    sigmas_for_budget,
    sigmas_karras,
    sigmas_lambda_uniform,
)

__all__ = [
    "ObjectiveConfig", "build_objective", "OBJECTIVE_NAMES",
    "cfg_denoiser", "OBJECTIVES", "Objective", "DDPMObjective", "CosineObjective", "EDMObjective",
    "TrainingBatch", "edm_scalings", "get_objective", "SAMPLERS", "get_sampler", "nfe", "steps_for_budget",
    "alpha_bar_cosine", "alpha_bars_linear", "sigma_from_alpha_bar", "sigmas_cosine", "sigmas_ddpm",
    "sigmas_exponential", "sigmas_lambda_uniform", "sigmas_karras", "SCHEDULES", "schedule_for_budget",
    "sigmas_for_budget",
]

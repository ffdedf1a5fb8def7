"""Consistency distillation: a student of a trained EDM model that samples in 1-4 steps (recipe `distill`).

Why consistency distillation rather than progressive distillation: one training run gives a model
for every step count (1, 2, 4, ...), where progressive distillation halves the steps one stage at a
time, each stage a training run of its own; and iCT's improvements (pseudo-Huber loss, the student
as its own target, no EMA teacher) make it stable on a small budget. The student starts as a copy of
the teacher's network (same U-Net, EDM's c_in and c_noise); only its output scalings change to the
consistency parametrisation (diffusion/consistency.py). `minidiffusion train fmnist-distill --out DIR`
distils the shipped `fmnist` model; `sample DIR --steps 1|2|4` samples it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..config import check_number
from ..device import resolve_device
from ..diffusion.config import build_objective
from ..diffusion.consistency import ConsistencyObjective, consistency_grid, heun_step, pseudo_huber
from ..errors import ConfigError
from ..learner import Callback
from ..learner.callbacks import MetricsCB
from ..learner.ema import EMACB
from ..learner.precision import precision_of
from ..learner.time_budget import TimeBudgetCB
from ..nn.unet import drop_labels
from ..pipelines.image import DiffusionModel, save_model
from ..runs import MODEL, SAMPLES
from .callbacks import DiffusionCB
from .common import fit_epochs, is_main, start_run
from .diffusion import DiffusionConfig, diffusion_learner, load_training_data, resolve_config

__all__ = ["DistillConfig", "ConsistencyDistillCB", "train_distill", "load_teacher"]


@dataclass
class DistillConfig(DiffusionConfig):
    """A consistency-distillation run: the teacher, the distillation grid, and the diffusion run settings."""

    recipe: ClassVar[str] = "distill"

    teacher: str = "fmnist"  # a shipped model name or a run directory (an EDM model)
    grid: int = 40  # N: sigmas of the distillation grid (Karras' rho = 7 from sigma_min to sigma_max)
    huber: bool = True  # pseudo-Huber distance (iCT); False: squared L2

    def __post_init__(self):
        super().__post_init__()
        check_number("grid", self.grid, lo=2, hi=10_000, integer=True)


def load_teacher(name: str, device) -> DiffusionModel:
    """Return the teacher: a shipped model (by name) or a run directory; it must be an EDM model."""
    teacher = DiffusionModel.from_run(name, device) if Path(name).is_dir() else \
        DiffusionModel.from_pretrained(name, device)
    if teacher.cfg.objective != "edm":
        raise ConfigError(f"the teacher {name} is a {teacher.cfg.objective} model; consistency distillation here "
                          "starts from an EDM model (objective=edm)")
    return teacher


class ConsistencyDistillCB(Callback):
    """The stages: loss = lambda_n d(f(x_{n+1}, sigma_{n+1}), stopgrad f(heun(x_{n+1}), sigma_n)) (consistency.py)."""

    order = 10

    def __init__(self, teacher: DiffusionModel, student: ConsistencyObjective, grid: torch.Tensor, n_classes: int,
                 cond_drop: float, huber: bool):
        self.teacher = teacher.objective.denoiser(teacher.net.eval().requires_grad_(False))
        self.teacher_net, self.student, self.grid = teacher.net, student, grid
        self.n_classes, self.cond_drop, self.huber = n_classes, cond_drop, huber

    def before_fit(self, learn) -> None:
        self.teacher_net.to(next(learn.model.parameters()).device)

    def predict(self, learn) -> None:
        x0 = learn.batch[0]
        cond = {}
        if self.n_classes:
            labels = learn.batch[1]
            if learn.training and self.cond_drop:
                labels = drop_labels(labels, self.cond_drop, self.n_classes)
            cond["label"] = labels
        b, grid = len(x0), self.grid.to(x0.device)
        n = torch.randint(0, len(grid) - 1, (b,), device=x0.device)
        lo, hi = grid[n], grid[n + 1]
        x_hi = x0 + hi.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1)) * torch.randn_like(x0)
        f = self.student.denoiser(learn.model)
        with torch.no_grad():
            x_lo = heun_step(self.teacher, x_hi, hi, lo, **cond)
            target = f(x_lo, lo, **cond).float()
        pred = f(x_hi, hi, **cond).float()
        dist = pseudo_huber(pred, target) if self.huber else (pred - target).pow(2).flatten(1).mean(1)
        learn.preds, learn.loss = None, (dist / (hi - lo).float()).mean()

    def get_loss(self, learn) -> None:
        pass  # computed with the prediction


def train_distill(cfg: DistillConfig, out: str | Path, resume: bool = False, progress: bool = True,
                  replace: bool = False) -> dict:
    """Distil `cfg.teacher` into a consistency model in run directory `out`; return a summary.

    The run's model samples with the "consistency" sampler in `steps` jumps (its default: 2).
    """
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, device)
    t = teacher.cfg
    cfg = dataclasses.replace(cfg, model=t.model, objective="consistency", sigma_data=t.sigma_data,
                              sigma_min=t.sigma_min, sigma_max=t.sigma_max, channels_last=t.channels_last,
                              image_size=t.image_size, sampler="consistency")
    data = load_training_data(cfg)
    cfg = resolve_config(cfg, data)
    if cfg.model != t.model:
        raise ConfigError("the data gives the student another network shape than the teacher's; distil on the data "
                          "the teacher was trained on")
    out = start_run(out, cfg, resume=resume, replace=replace, check_config=False)
    student_net = type(teacher.net)(cfg.model)
    student_net.load_state_dict(teacher.net.state_dict())  # the student starts as the teacher
    student = build_objective(cfg)
    learn = diffusion_learner(cfg, student_net, data.dls, device, out=out, progress=progress)
    diffusion = learn.cb(DiffusionCB)
    learn.cbs.remove(diffusion)
    grid = consistency_grid(cfg.grid, cfg.sigma_min, cfg.sigma_max)
    learn.cbs.append(ConsistencyDistillCB(teacher, student, grid, cfg.model.n_classes, cfg.cond_drop, cfg.huber))
    start = time.time()
    learn.fit(fit_epochs(cfg), resume=resume)
    if not is_main():  # the other processes of a torchrun launch: rank 0 writes the results
        return {}
    seconds = time.time() - start
    save_model(learn.cb(EMACB).ema_model, cfg, data.class_names, out / MODEL)
    dm = DiffusionModel.from_run(out, device=device)
    grid_png = dm.sample_grid(out / SAMPLES, seed=cfg.seed)
    metrics, budget = learn.cb(MetricsCB), learn.cb(TimeBudgetCB)
    return {"train_loss": (metrics.latest("train") or {}).get("loss"),
            "valid_loss": (metrics.latest("valid") or {}).get("loss"), "steps": learn.step,
            "seconds": round(seconds, 1), "train_seconds": round(budget.seconds, 1) if budget else None,
            "teacher": cfg.teacher, "precision": precision_of(learn), "run_dir": str(out), "samples": str(grid_png)}

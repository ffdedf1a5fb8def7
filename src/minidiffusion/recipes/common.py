"""What every recipe shares: how long to fit, and how a run starts and ends in one process or several.

Under torchrun (`torchrun --nproc_per_node=N -m minidiffusion train PRESET --out DIR`) every process runs the
whole recipe: it loads the same data, builds the same model from the same seed and trains through the same
Learner, to which `training_cbs` adds `DistributedCB` (learner/distributed.py). What touches the run
directory outside the Learner happens in rank 0 only: `start_run` prepares it and saves config.toml (a refusal
there stops every process with the same sentence), `on_main` writes the results (model, samples) while the
others wait. With one process all of this is what a recipe did before: nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import save_config
from ..errors import TrainingError
from ..learner.callback import Callback
from ..learner.distributed import distributed_cbs, distributed_fits, init_distributed, is_main, run_on_main, world
from ..paths import atomic_write
from ..runs import CONFIG, prepare_run_dir

__all__ = ["fit_epochs", "BUDGET_EPOCHS", "start_run", "training_cbs", "on_main", "world_size", "is_main",
           "check_trained_together"]

BUDGET_EPOCHS = 10_000  # with a `minutes` budget the clock ends training, never this many epochs


def fit_epochs(cfg) -> int:
    """Return how many epochs to pass to `Learner.fit`: cfg.epochs, or BUDGET_EPOCHS when `minutes` > 0."""
    return BUDGET_EPOCHS if getattr(cfg, "minutes", 0) > 0 else cfg.epochs


def world_size() -> int:
    """Return the number of processes training together (1 without torchrun)."""
    return world()[2]


def start_run(out: str | Path, cfg: Any, resume: bool = False, replace: bool = False,
              check_config: bool = True) -> Path:
    """Start (or reopen) run directory `out` for `cfg`; return it as a Path, in every process.

    Joins the processes of a torchrun launch first (`init_distributed`). Then rank 0 alone runs
    `prepare_run_dir` (with `check_config`, a resumed run must have been started with `cfg`) and saves `cfg`
    as config.toml; with several processes a comment line there records the world size. A refusal in
    rank 0 is raised, with the same class and sentence, in every process.
    """
    init_distributed()
    size = world_size()

    def prepare() -> Path:
        path = prepare_run_dir(out, resume=resume, replace=replace, config=cfg if check_config else None)
        saved = save_config(cfg, path / CONFIG)
        if size > 1:
            text = saved.read_text()
            with atomic_write(saved) as tmp:
                tmp.write_text(f"# trained by world_size = {size} processes (torchrun); batch_size is the global "
                               f"batch\n{text}")
        return path

    run_on_main(prepare)
    return Path(out)


def training_cbs(seed: int, sync_bn: bool = False) -> list[Callback]:
    """Return the callbacks every recipe's Learner gets for the launch: [DistributedCB] with several
    processes (seeded per rank from `seed`; `sync_bn`: batch norms use the global batch's statistics),
    [] with one."""
    return distributed_cbs(seed=seed, sync_batch_norm=sync_bn)


def on_main(fn: Callable, *args, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` in rank 0 only (writing the model, samples); return its result there and
    None in the other processes, which wait for it. A minidiffusion error in it is raised in every process."""
    return run_on_main(fn, *args, **kwargs)


def check_trained_together(recipe: str, fits_before: int) -> None:
    """Raise TrainingError when, with several processes, recipe `recipe` fitted without DistributedCB since the
    `distributed_fits()` count was `fits_before` (each process would have trained a model of its own); else return."""
    if world_size() > 1 and distributed_fits() == fits_before:
        raise TrainingError(f"the {recipe} recipe trained without DistributedCB, so each of the {world_size()} "
                            "processes trained a model of its own; give its Learner training_cbs(seed) and start the "
                            "run with start_run (recipes/common.py), or train it in one process")

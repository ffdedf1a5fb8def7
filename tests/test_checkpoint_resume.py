"""Resume after SIGKILL equals the uninterrupted run, bit for bit (the issue's acceptance test).

A run is killed with SIGKILL in the middle of epoch 2 (counting from 1), after a mid-epoch
checkpoint, then resumed with `resume=True` in a fresh process. The model uses dropout, the
batch augmentation draws from torch, python `random` and numpy, and training uses AdamW +
OneCycleCB + EMACB, so model, optimizer, scheduler, EMA, metrics and all RNG states must be
restored exactly. (Resuming from an end-of-epoch checkpoint is tested in-process in
test_checkpoint.py, which also shows that skipping the RNG restore breaks the equality.)

This file is also the script the subprocesses run: `python test_checkpoint_resume.py RUN_DIR MODE`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minidiffusion.learner import (
    EMACB,
    BatchTransformCB,
    Callback,
    CheckpointCB,
    Learner,
    MetricsCB,
    OneCycleCB,
    list_checkpoints,
)
from test_learner_helpers import assert_same_weights, mlp, regression_dls

KILL_AT = (1, 4)  # (epoch, iteration), both from 0: the 5th of 6 batches of the 2nd epoch


def augment(x: torch.Tensor) -> torch.Tensor:
    """A batch augmentation drawing from all three RNGs: torch noise, python scale, numpy shift."""
    scale = 1.0 + 0.2 * (random.random() - 0.5)
    shift = float(np.random.randn()) * 0.05
    return x * scale + shift + 0.1 * torch.randn_like(x)


class KillCB(Callback):
    """SIGKILL this process before batch `at` -- no cleanup, no flushing, like a power cut."""

    def __init__(self, at: tuple[int, int]):
        self.at = at

    def before_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def train(run_dir: Path, resume: bool = False, kill: bool = False) -> Learner:
    """Run the 3-epoch training of this test in `run_dir`; returns the learner."""
    torch.set_num_threads(1)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    cbs = [BatchTransformCB(augment), MetricsCB(), OneCycleCB(max_lr=1e-2), EMACB(decay=0.9),
           CheckpointCB(every_n_steps=4, keep=3)]
    if kill:
        cbs.append(KillCB(KILL_AT))
    learn = Learner(mlp(dropout=0.3), regression_dls(n_train=48, bs=8), lr=1e-3, cbs=cbs, path=run_dir,
                    opt_func=partial(torch.optim.AdamW, eps=1e-5))
    return learn.fit(3, resume=resume)


def save_result(learn: Learner, out: Path) -> None:
    """Write the final model and EMA weights and the metrics history into `out`."""
    tensors = {f"model/{k}": v for k, v in learn.model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in learn.cb(EMACB).ema_model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "result.safetensors")
    (out / "history.json").write_text(json.dumps(learn.cb(MetricsCB).history))


def _run(run_dir: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(run_dir), mode], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    killed = _run(tmp_path / "killed", "kill")  # runs while the reference trains here
    ref = train(tmp_path / "ref")
    out, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    names = [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")]
    # steps 4 (epoch 0) and 8 (epoch 1, iter 1) and the end of epoch 0 (step 6)
    assert names == ["ckpt-000001-e0000-i000004", "ckpt-000002-e0001-i000000", "ckpt-000003-e0001-i000002"]

    resumed = _run(tmp_path / "killed", "resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "resumed from ckpt-000003-e0001-i000002" in out
    ref_weights = {f"model/{k}": v for k, v in ref.model.state_dict().items()}
    ref_weights.update({f"ema/{k}": v for k, v in ref.cb(EMACB).ema_model.state_dict().items()})
    assert_same_weights(load_file(tmp_path / "killed" / "result.safetensors"), ref_weights)
    assert json.loads((tmp_path / "killed" / "history.json").read_text()) == ref.cb(MetricsCB).history


if __name__ == "__main__":
    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    learn = train(run_dir, resume=mode == "resume", kill=mode == "kill")
    save_result(learn, run_dir)

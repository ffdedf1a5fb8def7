"""The script tests/test_distributed.py runs in each process: tiny trainings, one process or several under torchrun.

    python -m torch.distributed.run --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:0 \\
        tests/distributed_harness.py TASK RUN_DIR SIDE_DIR [--resume] [--kill EPOCH,ITER] [--fail MODE]
    python tests/distributed_harness.py TASK RUN_DIR SIDE_DIR          (the same training in one process)

TASK `mlp`: a deterministic 3 -> 16 -> 1 regression MLP (no dropout, no batch norm) on 45 items with a global
batch of 8 (the last batch, 5 items, splits 3 + 2) and 13 validation items in batches of 6 (the last one, 1 item,
lands on rank 0 only), AdamW + OneCycleCB + EMACB + MetricsCB + ProgressCB (loss.png) + CheckpointCB; the item
ids every process trains on are recorded. TASK `diffusion`: a tiny class-conditional U-Net with the EDM objective
through DiffusionCB (noise, sigmas and label dropout drawn from the global RNG) behind a batch norm (buffers
that each process updates on its own), the same callbacks. TASK `unet`: the same U-Net without the batch norm, whose
2-process weights must be the single process's; in one process, `EmulateRanks` draws each rank's noise from that
rank's RNG stream for that rank's items of the global batch, which is what the two processes do. TASK `classifier`:
the classifier recipe's own Learner (`classifier_learner`: a tiny ResNet with batch norm and dropout, AdamW,
one-cycle, label smoothing; it adds DistributedCB itself) on 48 random 16x16 images, with `sync_bn = false`; in one
process `EmulateRanks` also runs each rank's items through the batch norm separately and keeps rank 0's running
statistics. TASK `syncbn`: the same classifier without dropout and with `sync_bn = true` (batch norms over the global
batch): in one process it needs no emulation at all.

RUN_DIR is the run directory (only rank 0 may write there: with several processes an audit hook records every
write, rename, mkdir and removal each one makes under it). Each process writes its own results into SIDE_DIR,
which is not the run: `rank{R}.json` (world size, item ids per epoch, the writes seen, LRs, metrics history) and
`rank{R}.safetensors` (final weights as model/..., EMA as ema/...). `--kill E,I`: rank 1 SIGKILLs itself before
training batch I of epoch E. `--fail raise|stall`: rank 1 raises, or sleeps 600 s, before its third training batch.
Before training, rank 0 refuses something through `run_on_main` (every process records the sentence it got, as
`refusal`); in `mlp`, after training, each process runs the model on its `shard_range` of 7 inputs and `gather`s
the outputs, and a FIDCB scores 10 "samples" each epoch (image i drawn from seed + i, so any split of them is the
same set; features: 2x2 average pooling) against a fixed reference; each process records how many it drew.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minidiffusion.data.loaders import DataLoaders, TensorLoader
from minidiffusion.errors import ConfigError
from minidiffusion.learner import EMACB, Callback, CheckpointCB, Learner, MetricsCB, OneCycleCB, ProgressCB
from minidiffusion.learner.distributed import (
    distributed_cbs,
    gather,
    init_distributed,
    rank_seed,
    run_on_main,
    shard_range,
    world,
)
from minidiffusion.recipes.callbacks import FIDCB, DiffusionCB

RANK = world()[0]


def audit_writes(run_dir: Path, log: list[str]) -> None:
    """Record in `log` every path under `run_dir` this process opens for writing, renames, creates or removes."""
    root = str(run_dir.resolve())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple) -> None:
        paths = []
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (mode and any(c in str(mode) for c in "wax+")) or (not mode and isinstance(flags, int)
                                                                and flags & write_flags):
                paths = [args[0]]
        elif event in ("os.rename", "os.replace"):
            paths = list(args[:2])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [args[0]]
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(p))
                if p == root or p.startswith(root + os.sep):
                    log.append(f"{event} {os.path.relpath(p, root)}")

    sys.addaudithook(hook)


def kill_family(pid: int) -> None:
    """SIGKILL process `pid` and all its descendants at once, like a power cut (torchrun starts each worker in a
    session of its own, so a process-group kill would miss them: they are found through /proc's parent ids)."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    family, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in family} - family
        family, grew = family | more, bool(more)
    for p in family:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RecordIds(Callback):
    """Keep the item ids (the last tensor of each batch) of every training batch, per epoch."""

    def __init__(self):
        self.ids: dict[int, list[list[int]]] = {}

    def after_batch(self, learn):
        if learn.training:
            self.ids.setdefault(learn.epoch, []).append(learn.batch[-1].tolist())


class Hello(Callback):
    """Print one line per process at the end of fit (only rank 0's may reach stdout)."""

    def after_fit(self, learn):
        print(f"hello from rank {RANK}", flush=True)


class Kill(Callback):
    """SIGKILL rank 1 before training batch `at` = (epoch, iter): no cleanup, like a power cut."""

    def __init__(self, at: tuple[int, int]):
        self.at = at

    def before_batch(self, learn):
        if RANK == 1 and learn.training and (learn.epoch, learn.iter) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class Fail(Callback):
    """Rank 1 raises (`raise`) or hangs for ten minutes (`stall`: the test kills it) before its third training batch."""

    def __init__(self, how: str):
        self.how = how

    def before_batch(self, learn):
        if RANK == 1 and learn.training and learn.step == 2:
            if self.how == "stall":
                time.sleep(600)
            raise RuntimeError("rank 1 fails on purpose")


class EmulateRanks(Callback):
    """In one process, train on each global batch as `n` processes do: rank r's items r, r + n, ... go through
    DiffusionCB's predict (or the model and the loss function) with rank r's global RNG stream (seeded with
    `rank_seed` at fit start, as DistributedCB seeds them), and the loss is the mean over the global batch (DDP
    averages the n per-rank means). Buffers (batch-norm running statistics) end as rank 0's shard left them."""

    order = 11  # above DiffusionCB (10): the Learner runs this predict

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def before_fit(self, learn):
        self.states = []
        for r in range(self.n):
            torch.manual_seed(rank_seed(self.seed, r, self.n))
            self.states.append(torch.get_rng_state())

    def _shard_predict(self, learn) -> None:
        diffusion = learn.cb(DiffusionCB)
        if diffusion is not None:
            diffusion.predict(learn)
        else:
            learn.preds = learn.model(learn.batch[0])
            learn.loss = learn.loss_func(learn.preds, *learn.batch[1:])

    def predict(self, learn):
        if not learn.training:
            return self._shard_predict(learn)
        batch, total, preds = learn.batch, 0.0, [None] * self.n
        # each shard starts from the same buffers; new tensors, not in-place copies (backward needs the old ones)
        slots = [(m, name) for m in learn.model.modules() for name, b in m._buffers.items() if b is not None]
        start = [m._buffers[name] for m, name in slots]
        for r in range(self.n):
            for (m, name), b0 in zip(slots, start, strict=True):
                m._buffers[name] = b0.clone()
            torch.set_rng_state(self.states[r])
            learn.batch = tuple(t[r::self.n] for t in batch)
            self._shard_predict(learn)
            total = total + learn.loss * len(learn.batch[0])
            preds[r] = learn.preds
            self.states[r] = torch.get_rng_state()
            if r == 0:
                rank0 = [m._buffers[name] for m, name in slots]
        for (m, name), b0 in zip(slots, rank0, strict=True):
            m._buffers[name] = b0
        if preds[0] is not None:  # back in the global batch's order, for the metrics
            full = preds[0].new_empty((len(batch[0]), *preds[0].shape[1:]))
            for r in range(self.n):
                full[r::self.n] = preds[r]
            learn.preds = full
        learn.batch, learn.loss = batch, total / len(batch[0])

    def get_loss(self, learn):
        pass  # computed in predict


N_FID = 10


def fid_samples(drawn: list[int]):
    """A FIDCB sample function whose image i comes from seed + i alone; it records how many it was asked for."""

    def sample(learn, n: int, seed: int) -> torch.Tensor:
        drawn.append(n)
        return torch.stack([torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed + i)) * 2 - 1
                            for i in range(n)])

    return sample


def fid_callback(drawn: list[int]) -> FIDCB:
    fid = FIDCB(fid_samples(drawn), every=1, n=N_FID, seed=7, feature_net=nn.Sequential(nn.AvgPool2d(4), nn.Flatten()),
                show=False)
    fid.reference = torch.rand(30, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return fid


def refuse() -> None:
    """Refuse, as prepare_run_dir does when a run directory already holds a run (run in rank 0 only)."""
    if RANK != 0:
        raise AssertionError("run_on_main ran its function outside rank 0")
    raise ConfigError("runs/x already holds a run (checkpoints/); pass --resume to continue it")


def mse_ignoring_ids(preds: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(preds, y)


def mlp_learner(run_dir: Path, cbs: list) -> Learner:
    g = torch.Generator().manual_seed(0)
    n_train, n_valid = 45, 13
    x = torch.randn(n_train + n_valid, 3, generator=g)
    y = x @ torch.tensor([[2.0], [-1.0], [0.5]]) + 0.3 + 0.01 * torch.randn(n_train + n_valid, 1, generator=g)
    ids = torch.arange(n_train + n_valid)
    dls = DataLoaders(TensorLoader(x[:n_train], y[:n_train], ids[:n_train], batch_size=8, shuffle=True, seed=3),
                      TensorLoader(x[n_train:], y[n_train:], ids[n_train:], batch_size=6))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    cbs = [MetricsCB(), OneCycleCB(max_lr=1e-2), EMACB(decay=0.9), ProgressCB(plot=True),
           CheckpointCB(every_n_steps=4, keep=2), RecordIds(), *cbs]
    return Learner(model, dls, mse_ignoring_ids, lr=1e-3, cbs=cbs, path=run_dir,
                   opt_func=partial(torch.optim.AdamW, eps=1e-5))


class WithBatchNorm(nn.Module):
    """A batch norm in front of the U-Net: running statistics each process updates from its own items."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.bn, self.unet = nn.BatchNorm2d(1), unet

    def forward(self, x, noise_level, **cond):
        return self.unet(self.bn(x), noise_level, **cond)


def diffusion_learner(run_dir: Path, cbs: list, batch_norm: bool = True) -> Learner:
    from minidiffusion.diffusion.objectives import EDMObjective
    from minidiffusion.nn.unet import UNet, UNetConfig
    from minidiffusion.recipes.callbacks import DiffusionCB

    g = torch.Generator().manual_seed(0)
    n = 64
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.full((n, 1, 8, 8), -1.0)
    for i, lab in enumerate(labels.tolist()):  # a bright bar whose position is the label
        images[i, :, 1 + 2 * lab: 3 + 2 * lab, 2:6] = 1.0
    ids = torch.arange(n)
    dls = DataLoaders(TensorLoader(images[:48], labels[:48], ids[:48], batch_size=8, shuffle=True, seed=5),
                      TensorLoader(images[48:], labels[48:], ids[48:], batch_size=8))
    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=(8, 16), blocks=(1, 1), attention=(False, True), mid_blocks=1, head_dim=8,
                          norm_groups=4, n_classes=3))
    net = WithBatchNorm(net) if batch_norm else net
    cbs = [DiffusionCB(EDMObjective(), n_classes=3, cond_drop=0.2, seed=0), MetricsCB(), EMACB(decay=0.9),
           OneCycleCB(max_lr=3e-3), ProgressCB(plot=False), CheckpointCB(every_n_steps=3, keep=3), RecordIds(), *cbs]
    return Learner(net, dls, lr=1e-3, cbs=cbs, path=run_dir, opt_func=partial(torch.optim.AdamW, eps=1e-5))


def classifier_learner(run_dir: Path, cbs: list, sync_bn: bool = False) -> Learner:
    from minidiffusion.data.loaders import uint8_loaders
    from minidiffusion.nn.resnet import ResNetConfig
    from minidiffusion.recipes import classifier

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=g)
    y = (x.float().mean((1, 2, 3)) > 127.5).long() + (x[:, 0, :8].float().mean((1, 2)) > 127.5).long()
    data = classifier.ClassificationData(uint8_loaders((x[:48], y[:48]), (x[48:], y[48:]), 8, seed=0), x[48:], y[48:],
                                         ["a", "b", "c"])
    dropout = 0.0 if sync_bn else 0.1  # with sync_bn nothing random is left: one process needs no emulation
    cfg = classifier.ClassifierConfig(model=ResNetConfig(channels=(8, 16), blocks=(1,), dropout=dropout), epochs=2,
                                      batch_size=8, lr=1e-2, pad=0, flip=0.0, precision="fp32", device="cpu",
                                      sync_bn=sync_bn)
    learn = classifier.classifier_learner(classifier.resolve_config(cfg, data), None, progress=False, data=data)
    learn.cbs += [RecordIds(), *(cb for cb in cbs if type(cb).__name__ != "DistributedCB")]  # it has its own one
    return learn


def main(argv: list[str] | None = None) -> None:
    """Train as the command line `argv` says (see the module docstring); results go into SIDE_DIR."""
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["mlp", "diffusion", "unet", "classifier", "syncbn"])
    p.add_argument("run_dir", type=Path)
    p.add_argument("side_dir", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill", default=None, help="EPOCH,ITER")
    p.add_argument("--fail", choices=["raise", "stall"], default=None)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--emulate", type=int, default=0, help="unet in one process: emulate N processes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed(args.timeout)  # what a recipe does first (DistributedCB would do it in before_fit otherwise)
    try:
        run_on_main(refuse)
        refusal = None
    except ConfigError as e:  # rank 0's refusal reaches every process
        refusal = str(e)
    run_on_main(args.run_dir.mkdir, parents=True, exist_ok=True)  # prepare_run_dir, in rank 0 only
    writes: list[str] = []
    if world()[2] > 1:
        audit_writes(args.run_dir, writes)
    cbs = [Hello(), *distributed_cbs(seed=0, timeout=args.timeout)]
    if args.kill:
        cbs.append(Kill(tuple(int(v) for v in args.kill.split(","))))
    if args.fail:
        cbs.append(Fail(args.fail))
    if args.emulate:
        cbs.append(EmulateRanks(args.emulate))
    drawn: list[int] = []
    if args.task == "mlp":
        cbs.append(fid_callback(drawn))
        learn = mlp_learner(args.run_dir, cbs)
    elif args.task in ("classifier", "syncbn"):
        learn = classifier_learner(args.run_dir, cbs, sync_bn=args.task == "syncbn")
    else:
        learn = diffusion_learner(args.run_dir, cbs, batch_norm=args.task == "diffusion")
    learn.fit(args.epochs, resume=args.resume)
    args.side_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v for k, v in learn.model.state_dict().items()}
    if learn.cb(EMACB) is not None:
        tensors.update({f"ema/{k}": v for k, v in learn.cb(EMACB).ema_model.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, args.side_dir / f"rank{RANK}.safetensors")
    report = {"rank": RANK, "world_size": world()[2], "ids": learn.cb(RecordIds).ids, "writes": writes,
              "lrs": getattr(learn.cb(OneCycleCB), "lrs", None), "history": learn.cb(MetricsCB).history,
              "steps": learn.step,
              "refusal": refusal, "fid_drawn": drawn,
              "fid": [r["fid"] for r in learn.cb(FIDCB).history] if learn.cb(FIDCB) else []}
    if args.task == "mlp":  # evaluation split over the processes: each its share of the inputs, one gathered output
        x = torch.linspace(-2, 2, 21).reshape(7, 3)
        mine = shard_range(len(x))
        with torch.no_grad():
            report["gathered"] = gather(learn.model(x[mine.start: mine.stop])).tolist()
            report["direct"] = learn.model(x).tolist()
    (args.side_dir / f"rank{RANK}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()

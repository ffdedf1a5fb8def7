"""More than one process: data-parallel training under torchrun, one callback (`DistributedCB`) and a few helpers.

`torchrun --nproc_per_node=N -m minidiffusion train PRESET --out DIR` starts N copies of the same command and tells
each one its place through the environment (RANK, LOCAL_RANK, WORLD_SIZE; `world()` reads them). Every process
builds the same model from the same seed and holds the same in-memory data set; `DistributedCB` makes the N of
them train one model, as one process would with the same global batch:

- it joins the process group (gloo for CPU tensors, NCCL for CUDA ones; each process takes the GPU of its
  LOCAL_RANK) with a timeout on every collective, so a process that dies or stalls stops the others with a
  sentence instead of a hang;
- `batch_size` stays the *global* batch: of each batch one process would take, rank r takes items r, r + N,
  r + 2N, ... (`ShardedLoader`), so the N shards of an epoch are disjoint and cover the set, and each epoch is
  reshuffled from (seed, epoch) on every rank alike; the Learner sets the epoch, and a pass that was not told
  one takes the next, so the forgotten `set_epoch` of DistributedSampler cannot happen;
- the training forward pass runs through DistributedDataParallel (gradients are averaged over the processes
  during backward), but `learn.model` stays the raw module outside `predict`: checkpoints, EMA, saved
  weights and their state-dict keys are the single-process ones. A last global batch that does not split
  evenly is weighted so that every item counts as much as in one process (one that has fewer items than
  there are processes is dropped);
- every optimizer step is the same on every process, so weights, EMA, one-cycle and other per-step schedules
  (stepped once per optimizer step) stay identical; buffers are rank 0's after every step, as
  DistributedDataParallel makes them;
- with `sync_batch_norm` (what the classifier, autoencoder and super-resolution recipes ask for, `sync_bn =
  true` in their configs), every batch norm of the model normalises a training batch with the statistics of
  the *global* batch, summed over the processes (`sync_batch_norm`: torch's SyncBatchNorm runs on GPUs only,
  this one on CPUs too), so a model with batch norms trains as it does in one process and its running
  statistics are one process's; without it each process normalises with its own B/N items' statistics
  (DistributedDataParallel's default) and the running statistics are rank 0's; a time
  budget (TimeBudgetCB) follows rank 0's clock; `after_fit` checks that weights and EMA did stay identical;
- torch's, numpy's and python's global RNGs are seeded per rank (`rank_seed`) at fit start, so the noise a
  diffusion objective, label dropout or augmentation draws differs between processes; checkpoints hold every
  rank's RNG state (this callback's state), so `--resume` continues each stream exactly;
- only rank 0 writes: the other processes train with `learn.path = None` (no metrics.jsonl, plots, samples),
  their CheckpointCB only reads (to resume, every process loads the same checkpoint; rank 0 saves once all
  have finished the step) and their standard output is discarded during fit (errors still reach stderr);
- from `after_backward` on, `learn.loss` (and `learn.loss_parts`) is the global batch's; MetricsCB's sums and
  counts are added up over the processes at the end of each phase and before each checkpoint, so the recorded
  training and validation losses equal the single-process ones (validation is sharded too); rank 0 appends a
  {"phase": "distributed", "world_size": N, ...} record to metrics.jsonl when a fit starts.

With one process (no torchrun, or --nproc_per_node=1) `distributed_cbs()` returns no callback and nothing
changes. `gather`, `shard_range`, `run_on_main` and `average_gradients` are the helpers for work outside the
training step (evaluation split over the processes, preparing the run directory once, a second network such as
a GAN discriminator). This is the only module that imports `torch.distributed` (tests/test_layout.py).
"""

from __future__ import annotations

import atexit
import copy
import inspect
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import errors
from ..errors import ConfigError, TrainingError
from ..runs import append_metrics
from .callback import Callback
from .callbacks import MetricsCB
from .checkpoint import CheckpointCB
from .device import DeviceCB
from .ema import EMACB
from .state import capture_rng, flatten_state, restore_rng, unflatten_state
from .time_budget import TimeBudgetCB

__all__ = ["DEFAULT_TIMEOUT", "SyncBatchNorm", "sync_batch_norm",
           "world", "launched_by_torchrun", "is_main", "is_distributed", "init_distributed",
           "local_batch_size", "rank_seed", "shard_range", "gather", "barrier", "run_on_main", "average_gradients",
           "ShardedLoader", "DistributedCB", "distributed_cbs", "distributed_fits"]

DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the slowest process (a checkpoint write, a first compile)
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_state = {"failed": False, "timeout": DEFAULT_TIMEOUT, "fits": 0}
# DistributedDataParallel's switch for broadcasting buffers before each forward (newer torch: forward_sync_buffers)
_DDP_ARGS = inspect.signature(DistributedDataParallel).parameters
_FORWARD_SYNC = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"


# -- where this process stands --------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"the environment variable {name}={text!r} is not a whole number; launch the processes "
                          "with torchrun, which sets it") from None


def world() -> tuple[int, int, int]:
    """Return (rank, local_rank, world_size) from torchrun's RANK, LOCAL_RANK and WORLD_SIZE ((0, 0, 1) without)."""
    rank, local_rank, size = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"RANK={rank}, LOCAL_RANK={local_rank} and WORLD_SIZE={size} do not describe a process "
                          "of a launch (0 <= RANK < WORLD_SIZE); launch the processes with torchrun")
    return rank, local_rank, size


def launched_by_torchrun() -> bool:
    """Return True when RANK, LOCAL_RANK and WORLD_SIZE are all set, as torchrun sets them for each process."""
    return all(os.environ.get(k) for k in _ENV)


def is_main() -> bool:
    """Return True in the process that writes files and prints (rank 0, or the only process)."""
    return world()[0] == 0


def is_distributed() -> bool:
    """Return True when this process has joined a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _shutdown() -> None:
    """At exit: leave the process group, unless a failure means the others may still wait on this one."""
    if dist.is_available() and dist.is_initialized() and not _state["failed"]:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the process is ending either way
            pass


def init_distributed(timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group of this launch once (later calls do nothing); returns True with more than one process.

    On a machine with CUDA each process first takes the GPU numbered by its LOCAL_RANK. The backend is gloo, plus
    NCCL for CUDA tensors where there is CUDA; `timeout` (seconds) bounds every collective, so a process that
    died or stalls ends the others instead of hanging them.
    """
    rank, local_rank, size = world()
    if size == 1:
        return False
    if not dist.is_available():
        raise ConfigError("this build of torch has no torch.distributed; install one that has it to train with "
                          "more than one process")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise ConfigError("WORLD_SIZE is set but MASTER_ADDR or MASTER_PORT is not; launch the processes with "
                          "torchrun, which sets all of them")
    cuda = torch.cuda.is_available()
    if cuda and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if cuda and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise TrainingError(f"process {rank} of {size} could not join the others ({_short(e)}); check that every "
                            "process was started by the same torchrun command and can reach MASTER_ADDR") from e
    _state["timeout"] = float(timeout)
    atexit.register(_shutdown)
    return True


def local_batch_size(batch_size: int, world_size: int | None = None) -> int:
    """Return the batch each process takes, `batch_size` (the global batch) / `world_size` (default: this launch's).

    Raises ConfigError when it does not divide evenly.
    """
    size = world()[2] if world_size is None else world_size
    if batch_size % size:
        raise ConfigError(f"batch_size {batch_size} does not split evenly over {size} processes; choose a multiple "
                          f"of {size} (batch_size is the global batch, each process takes batch_size / {size})")
    return batch_size // size


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """Return the seed of rank `rank`'s global RNGs: seed * world_size + rank + 1 (never the run's own seed)."""
    return seed * world_size + rank + 1


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# -- collectives ---------------------------------------------------------------------------------------------
def _short(e: BaseException) -> str:
    """The first line of an error, without the C++ source location torch puts in front of it."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0].rstrip(".")[:300]


def _all_gather_json(obj: Any) -> list:
    """Return `obj` (JSON-able) of every process, in rank order; on CPU tensors (gloo)."""
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s.item())].numpy())) for p, s in zip(parts, sizes, strict=True)]


def _tree_to_json(tree: Any) -> dict:
    """A nest of dicts/lists/tuples/tensors (an RNG state) as JSON-able data; `_tree_from_json` inverts it."""
    tensors, skeleton = flatten_state(tree)
    return {"skeleton": skeleton,
            "tensors": {k: [str(t.dtype).removeprefix("torch."), list(t.shape), t.cpu().flatten().tolist()]
                        for k, t in tensors.items()}}


def _tree_from_json(data: dict) -> Any:
    tensors = {k: torch.tensor(values, dtype=getattr(torch, dtype)).reshape(shape)
               for k, (dtype, shape, values) in data["tensors"].items()}
    return unflatten_state(data["skeleton"], tensors)


def barrier() -> None:
    """Return once every process got here (no-op with one process)."""
    if is_distributed():
        dist.all_reduce(torch.zeros(1))


def shard_range(n: int) -> range:
    """Return this process's contiguous share of range(n): rank r gets [r * n // N, (r + 1) * n // N).

    Concatenating the shares in rank order (`gather`) gives back range(n) in order.
    """
    rank, size = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    return range(rank * n // size, (rank + 1) * n // size)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Return `x` [n_r, ...] of every process concatenated along dim 0 in rank order, on every process.

    The n_r may differ; the other dimensions and the dtype must agree. With one process, returns `x`.
    For evaluation: each process makes its `shard_range` of the samples, `gather` their features, one FID.
    """
    if not is_distributed():
        return x
    shapes = _all_gather_json([str(x.dtype), list(x.shape)])
    if any(s[0] != shapes[0][0] or s[1][1:] != shapes[0][1][1:] for s in shapes):
        raise ConfigError(f"gather needs tensors of one dtype and the same shape after dim 0 in every process, got "
                          f"{', '.join(f'{d} {tuple(s)}' for d, s in shapes)}")
    longest = max(s[1][0] for s in shapes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: s[1][0]] for p, s in zip(parts, shapes, strict=True)])


def run_on_main(fn: Callable, *args, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` in rank 0 only while the others wait; return its result there, None elsewhere.

    When it raises a minidiffusion error, every process raises it (the same class and sentence), so a refusal
    such as "the run directory already holds a run" stops the whole launch at once. With one process it just
    calls `fn`.
    """
    if not init_distributed(_state["timeout"]):
        return fn(*args, **kwargs)
    result, report = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            report = [type(e).__name__ if isinstance(e, errors.MinidiffusionError) else "TrainingError",
                      str(e) if isinstance(e, errors.MinidiffusionError) else f"process 0 failed: {_short(e)}"]
            _all_gather_json(report)
            raise
    reports = _all_gather_json(report)
    if reports[0] is not None:
        cls = getattr(errors, reports[0][0], TrainingError)
        raise cls(reports[0][1])
    return result


def average_gradients(module: nn.Module) -> None:
    """Average the gradients of `module`'s parameters over the processes, in place (no-op with one process).

    For a network trained beside the Learner's model without DistributedDataParallel (a GAN discriminator):
    call it between its backward and its optimizer step, so it stays the same in every process.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


# -- batch norm over the global batch -----------------------------------------------------------------------
def _global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (mean [C], biased variance [C], item count) of x [B, C, ...] over every process's batch, differentiably
    (the all-reduce's backward sums the gradients of the statistics over the processes, as torch's SyncBatchNorm)."""
    import torch.distributed.nn.functional as dist_fn

    dims = [0, *range(2, x.dim())]
    xf = x.float()
    count = xf.new_tensor([x.numel() // x.shape[1]])
    stats = dist_fn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    return mean, (stats[c: 2 * c] / n - mean * mean).clamp(min=0), n


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A batch norm whose training statistics are the global batch's over the processes (CPU or GPU); in eval mode,
    or with one process, exactly nn.BatchNorm2d/1d. Made from an existing batch norm by `sync_batch_norm`, so it
    keeps that layer's parameters, buffers and state-dict keys."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects inputs [B, C, ...], got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised x [B, C, ...] (same shape); a training batch uses the statistics of all processes."""
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, n = _global_moments(x)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
                self.num_batches_tracked.add_(1)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module) -> Callable[[], None]:
    """Make every batch norm inside `module` a `SyncBatchNorm` in place (same parameters, buffers, keys); return the
    function that turns them back."""
    swapped = [(m, type(m)) for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm)]
    for m, _ in swapped:
        m.__class__ = SyncBatchNorm

    def undo() -> None:
        for m, cls in swapped:
            m.__class__ = cls

    return undo


# -- the data ------------------------------------------------------------------------------------------------
class ShardedLoader:
    """Rank `rank`'s share of an in-memory loader (a TensorLoader): of each of its batches, items rank, rank + N, ...

    `loader` keeps describing the *global* batches: its batch_size, shuffle order (seeded by its seed and the
    epoch, the same on every rank), drop_last and batch_tfm (applied to this rank's items). With `training=True`
    the global batch_size must divide by `world_size`, every rank yields the same number of batches (a last
    global batch with fewer items than ranks is dropped) and `batch_weight`, set with each batch, is
    items here * world_size / items in the global batch: what the loss must be multiplied by for every item to
    weigh as in one process. With `training=False` (validation) a rank whose share of the last batch is empty
    yields one batch fewer, so every item is still seen once. `set_epoch` picks the epoch's order; a pass
    without it takes the epoch after the previous pass. `start_iter` skips global batches (resume).
    Yields tuples like the loader.
    """

    def __init__(self, loader, rank: int, world_size: int, training: bool = True):
        missing = [a for a in ("tensors", "batch_size", "order", "set_epoch") if not hasattr(loader, a)]
        if missing:
            raise ConfigError(f"DistributedCB shards in-memory loaders (TensorLoader: .tensors, .order(), "
                              f".set_epoch()); a {type(loader).__name__} lacks {', '.join(missing)}")
        if training:
            local_batch_size(loader.batch_size, world_size)
        self.loader, self.rank, self.world_size, self.training = loader, rank, world_size, training
        self.start_iter, self.batch_weight = 0, 1.0
        self._passes, self._told = 0, False

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def batch_size(self) -> int:
        """Items per batch in this process (the global batch_size / world_size for training)."""
        return -(-self.loader.batch_size // self.world_size)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next pass uses."""
        return self.loader.epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle order the next pass uses (the same on every rank)."""
        self.loader.set_epoch(epoch)
        self._told = True

    def _sizes(self) -> list[int]:
        """Items in each global batch of an epoch."""
        n, bs = len(self.loader.tensors[0]), self.loader.batch_size
        sizes = [bs] * (n // bs) + ([] if self.loader.drop_last or not n % bs else [n % bs])
        if self.training and sizes and sizes[-1] < self.world_size:
            sizes.pop()
        return sizes

    def _mine(self, size: int) -> int:
        return len(range(self.rank, size, self.world_size))

    def __len__(self) -> int:
        return len([s for s in self._sizes() if self.training or self._mine(s)])

    def __iter__(self) -> Iterator[tuple]:
        if self._passes and not self._told:
            self.loader.set_epoch(self.loader.epoch + 1)
        self._passes, self._told = self._passes + 1, False
        order = self.loader.order()
        sizes = self._sizes()
        start, self.start_iter = self.start_iter, 0
        first = sum(sizes[:start])
        for size in sizes[start:]:
            ids = torch.arange(first, first + size) if order is None else order[first: first + size]
            first += size
            mine = ids[self.rank::self.world_size]
            if not len(mine):
                continue  # validation only: this rank has no item of the last batch
            self.batch_weight = len(mine) * self.world_size / size
            batch = tuple(t[mine] for t in self.loader.tensors)
            yield self.loader.batch_tfm(batch) if self.loader.batch_tfm else batch


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics), one broadcast per dtype and device."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in model.buffers():
        groups.setdefault((b.dtype, b.device), []).append(b)
    for buffers in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, 0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()


def _checksums(modules: list[nn.Module]) -> list[float]:
    """The float64 sum of every tensor of the modules' state dicts: equal weights, equal lists."""
    tensors = [t for m in modules for t in m.state_dict().values()]
    return torch.stack([t.detach().double().sum().cpu() for t in tensors]).tolist() if tensors else []


# -- the callback --------------------------------------------------------------------------------------------
class DistributedCB(Callback):
    """Train with every process of a torchrun launch as one: see the module docstring for what it does.

    `seed` seeds each rank's global RNGs (`rank_seed`), `timeout` (seconds) bounds every collective,
    `find_unused_parameters` goes to DistributedDataParallel (for models some of whose parameters get no
    gradient in a step), `sync_batch_norm` makes the model's batch norms use the global batch's statistics
    during the fit (`SyncBatchNorm`). Its state (every rank's RNG state) is saved in checkpoints under "DistributedCB";
    other callbacks' state is rank 0's, which is every rank's. With one process it does nothing.
    """

    order = -50  # before TimeBudgetCB/NaNGuardCB (-20), DeviceCB (-10), the schedules (30) and MetricsCB (50)
    skip_in_lr_find = True
    state_key = "DistributedCB"

    def __init__(self, seed: int = 0, timeout: float = DEFAULT_TIMEOUT, find_unused_parameters: bool = False,
                 sync_batch_norm: bool = False):
        if timeout <= 0:
            raise ConfigError(f"DistributedCB needs timeout > 0 seconds, got {timeout}")
        self.seed, self.timeout, self.find_unused_parameters = seed, timeout, find_unused_parameters
        self.sync_batch_norm = sync_batch_norm
        self.active, self.rank, self.world_size = False, 0, 1
        self._ddp, self._raw, self._rng_states, self._resume_rng = None, None, None, None
        self._undo: list[Callable[[], None]] = []

    # -- fit start / end ------------------------------------------------------------------------------------
    def before_fit(self, learn) -> None:
        self.active = init_distributed(self.timeout)
        if not self.active:
            return
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        _state["fits"] += 1
        self._check_device(learn)
        self._undo, self._ddp, self._raw, self._resume_rng = [], None, None, None
        self._first_batch, self._first_epoch, self._base = True, True, None
        dls = copy.copy(learn.dls)
        dls.train = ShardedLoader(learn.dls.train, self.rank, self.world_size, training=True)
        if getattr(learn.dls, "valid", None) is not None:
            dls.valid = ShardedLoader(learn.dls.valid, self.rank, self.world_size, training=False)
        original_dls, learn.dls = learn.dls, dls
        self._undo.append(lambda: setattr(learn, "dls", original_dls))
        if self.sync_batch_norm:
            self._undo.append(sync_batch_norm(learn.model))
        self.path = learn.path
        for ckpt in [cb for cb in learn.cbs if isinstance(cb, CheckpointCB)]:
            self._adopt(learn, ckpt)
        if self.rank != 0:
            learn.path = None
            self._undo.append(lambda: setattr(learn, "path", self.path))
            stdout, devnull = sys.stdout, open(os.devnull, "w")  # noqa: SIM115 - closed in cleanup_fit
            sys.stdout = devnull
            self._undo.append(lambda: (setattr(sys, "stdout", stdout), devnull.close()))
        _seed_all(rank_seed(self.seed, self.rank, self.world_size))  # a resumed run restores them in before_epoch

    def _check_device(self, learn) -> None:
        cb = learn.cb(DeviceCB)
        param = next(learn.model.parameters(), None)
        device = cb.device if cb is not None else (param.device if param is not None else torch.device("cpu"))
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"training with more than one process works on CPUs and CUDA GPUs, not on {device.type}; "
                              "use device=cpu or a CUDA machine")
        if device.type == "cuda":
            local = _env_int("LOCAL_WORLD_SIZE", self.world_size)
            if device.index is not None and local > 1:
                raise ConfigError(f"device={device} puts every process on one GPU; use device=cuda (or auto): each "
                                  "process takes the GPU numbered by its LOCAL_RANK")
            if world()[1] >= torch.cuda.device_count():
                raise ConfigError(f"this machine runs {local} processes but has {torch.cuda.device_count()} CUDA "
                                  "GPU(s); start at most one process per GPU (--nproc_per_node) or use device=cpu")

    def _adopt(self, learn, ckpt: CheckpointCB) -> None:
        """Make `ckpt` save from rank 0 only, once every rank is ready, and read from the same place everywhere."""
        if ckpt.dir is None and learn.path is not None:
            ckpt.dir = learn.path / "checkpoints"
            self._undo.append(lambda: setattr(ckpt, "dir", None))
        save = ckpt.save

        def save_from_rank0(learn, epoch: int, iter: int):
            self._sync_metrics(learn)  # the running sums of the phase, over all ranks, into the checkpoint
            self._rng_states = [_tree_from_json(s) for s in _all_gather_json(_tree_to_json(capture_rng()))]
            return save(learn, epoch, iter) if self.rank == 0 else None

        ckpt.save = save_from_rank0
        self._undo.append(lambda: ckpt.__dict__.pop("save", None))

    def after_fit(self, learn) -> None:
        if not self.active:
            return
        modules = [learn.model, *[cb.ema_model for cb in learn.cbs if isinstance(cb, EMACB) and cb.ema_model]]
        sums = _all_gather_json(_checksums(modules))
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        if bad:
            raise TrainingError(f"after training, the weights (or EMA) of process {bad[0]} differ from process 0's; "
                                "a callback must have changed one process's weights on its own")

    def cleanup_fit(self, learn) -> None:
        if not self.active:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo, self._ddp, self._raw = [], None, None
        exc = sys.exc_info()[1]
        if exc is None:
            return
        _state["failed"] = True  # the others may still wait on this process: do not tear the group down at exit
        if _is_collective_failure(exc):
            raise TrainingError(
                f"process {self.rank} of {self.world_size} lost the others at epoch {learn.epoch}, batch {learn.iter} "
                f"({_short(exc)}): another process failed (see its error) or did not answer within {self.timeout:g} s; "
                "the last checkpoint is intact, fix the cause and continue with --resume") from exc

    # -- epochs and batches ---------------------------------------------------------------------------------
    def before_epoch(self, learn) -> None:
        if not self.active:
            return
        self._base = None
        if hasattr(learn.dl, "set_epoch"):
            learn.dl.set_epoch(learn.epoch)
        if not self._first_epoch:
            return
        self._first_epoch = False
        if self._resume_rng is not None:  # after CheckpointCB restored rank 0's RNGs everywhere
            restore_rng(self._resume_rng)
            self._resume_rng = None
        elif learn.resume and (learn.step or learn.epoch):
            warnings.warn(f"the checkpoint holds no random-number state for {self.world_size} processes: each "
                          "process starts fresh streams, so this run will not continue exactly", stacklevel=2)
            _seed_all(rank_seed(self.seed + learn.step, self.rank, self.world_size))
        if self.rank == 0 and self.path is not None:
            bs = learn.dls.train.loader.batch_size
            append_metrics(self.path, {"epoch": learn.epoch, "phase": "distributed", "step": learn.step,
                                       "world_size": self.world_size, "batch_size": bs,
                                       "per_process": bs // self.world_size, "backend": str(dist.get_backend())})

    def before_batch(self, learn) -> None:
        if not self.active:
            return
        if self._base is None:
            self._base = self._snapshot(learn)
        if not learn.training:
            return
        if self._first_batch:
            self._first_batch = False
            self._check_same_start(learn)
        budget = learn.cb(TimeBudgetCB)
        if budget is not None:  # every rank follows rank 0's clock: the same LR and the same last step
            seconds = torch.tensor([budget.seconds], dtype=torch.float64)
            dist.broadcast(seconds, 0)
            budget.seconds = float(seconds.item())

    def _check_same_start(self, learn) -> None:
        """Every process must start from the same place, data and weights (or the shards would not add up)."""
        modules = [learn.model, *[cb.ema_model for cb in learn.cbs if isinstance(cb, EMACB) and cb.ema_model]]
        tensors = learn.dls.train.loader.tensors
        data = [[list(t.shape), (t.sum(dtype=torch.float64) if t.is_floating_point() else t.sum(dtype=torch.int64))
                 .item()] for t in tensors]
        mine = {"at": [learn.epoch, learn.iter, learn.step], "data": data, "weights": _checksums(modules)}
        everyone = _all_gather_json(mine)
        if any(e["at"] != everyone[0]["at"] for e in everyone):
            shown = ", ".join(f"process {r}: epoch {e} batch {i} step {s}"
                              for r, (e, i, s) in enumerate(x["at"] for x in everyone))
            raise TrainingError(f"the processes start training at different places ({shown}); they must all resume "
                                "from the same checkpoint directory")
        if any(e["data"] != everyone[0]["data"] for e in everyone):
            raise TrainingError("the processes hold different training data; load the same data in every process "
                                "(seed any random split or generation the same way everywhere)")
        if any(e["weights"] != everyone[0]["weights"] for e in everyone):
            raise TrainingError("the processes start with different weights; build the model from the same seed in "
                                "every process (torch.manual_seed before building it)")

    def before_predict(self, learn) -> None:
        if not (self.active and learn.training):
            return
        if self._ddp is None or self._raw is not learn.model:
            self._raw = learn.model
            device = next(learn.model.parameters()).device
            no_forward_sync = {_FORWARD_SYNC: False}  # after_step broadcasts the buffers, before the EMA looks
            self._ddp = DistributedDataParallel(learn.model, device_ids=[device] if device.type == "cuda" else None,
                                                find_unused_parameters=self.find_unused_parameters, **no_forward_sync)
        learn.model = self._ddp

    def cleanup_predict(self, learn) -> None:
        if self._ddp is not None and learn.model is self._ddp:
            learn.model = self._raw

    def before_backward(self, learn) -> None:
        if not self.active:
            return
        self._local_loss = learn.loss
        weight = getattr(learn.dl, "batch_weight", 1.0)
        if weight != 1.0:  # an uneven last batch: each item weighs as in one process
            learn.loss = learn.loss * weight

    def after_backward(self, learn) -> None:
        if not self.active:
            return
        n = float(len(learn.batch[0]))
        parts = dict(getattr(learn, "loss_parts", None) or {})
        local = self._local_loss.detach()
        values = torch.stack([local.double() * n, torch.tensor(n, dtype=torch.float64, device=local.device),
                              *[torch.as_tensor(v).detach().to(local.device).double() * n for v in parts.values()]])
        dist.all_reduce(values)
        learn.loss = (values[0] / values[1]).to(local.dtype)
        if parts:
            learn.loss_parts = {k: (v / values[1]).float() for k, v in zip(parts, values[2:], strict=True)}

    def after_step(self, learn) -> None:
        if self.active:
            _broadcast_buffers(learn.model)  # batch-norm statistics: rank 0's, as DistributedDataParallel would

    def after_epoch(self, learn) -> None:
        if self.active:
            self._sync_metrics(learn)

    def after_cancel_fit(self, learn) -> None:
        if self.active:
            self._sync_metrics(learn)  # MetricsCB records the partial phase next

    # -- MetricsCB's running sums, over all ranks -------------------------------------------------------------
    # MetricsCB keeps `_sums` (name -> sum of value * items) and `_count` (items) for the current phase. Every
    # rank adds its own batches; at the end of a phase and before a checkpoint each rank's additions since the
    # last such point are summed over the ranks, so every rank (and every checkpoint) holds the global sums.
    def _metrics(self, learn) -> list[MetricsCB]:
        return [cb for cb in learn.cbs if isinstance(cb, MetricsCB)]

    def _snapshot(self, learn) -> list:
        return [(dict(getattr(m, "_sums", {})), getattr(m, "_count", 0)) for m in self._metrics(learn)]

    def _sync_metrics(self, learn) -> None:
        base = self._base if self._base is not None else self._snapshot(learn)
        for m, (base_sums, base_count) in zip(self._metrics(learn), base, strict=True):
            if not hasattr(m, "_sums"):
                continue
            keys = list(m._sums)
            for ks in _all_gather_json(keys):
                keys += [k for k in ks if k not in keys]
            delta = torch.tensor([m._sums.get(k, 0.0) - base_sums.get(k, 0.0) for k in keys]
                                 + [float(m._count - base_count)], dtype=torch.float64)
            dist.all_reduce(delta)
            m._sums = {k: base_sums.get(k, 0.0) + d for k, d in zip(keys, delta[:-1].tolist(), strict=True)}
            m._count = base_count + int(round(delta[-1].item()))
        self._base = self._snapshot(learn)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Return {"world_size": N, "rng": [the RNG states (capture_rng) of ranks 0..N-1 at the last save]}."""
        states = self._rng_states if self._rng_states is not None else [capture_rng()]
        return {"world_size": len(states), "rng": list(states)}

    def load_state_dict(self, state: dict) -> None:
        """Keep this rank's RNG state of `state_dict()`, restored when the first epoch starts."""
        self._resume_rng = None
        if int(state["world_size"]) == self.world_size:
            self._resume_rng = state["rng"][self.rank]


def _is_collective_failure(exc: BaseException) -> bool:
    """True for the errors torch raises when a collective with the other processes broke or timed out."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "NCCL", "c10d", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "Timed out waiting", "ProcessGroup"))


def distributed_fits() -> int:
    """Return how many fits in this process trained through an active DistributedCB (with several processes)."""
    return _state["fits"]


def distributed_cbs(seed: int = 0, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list[Callback]:
    """Return [DistributedCB(seed, timeout, ...)] in a process of a launch of several, else [] (one process)."""
    return [DistributedCB(seed=seed, timeout=timeout, **kwargs)] if world()[2] > 1 else []

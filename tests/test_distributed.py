"""More than one process (learner/distributed.py): two processes train as one, only rank 0 writes, the shards of
an epoch partition the set, SIGKILL + torchrun resume is exact, and a process that fails stops the others.

The multi-process runs are tests/distributed_harness.py under torchrun (`python -m torch.distributed.run
--nproc_per_node=2`, gloo, OMP_NUM_THREADS=1), or, for the failure tests, two processes given the environment
torchrun would give them but no torchrun agent (which would kill the survivor itself and hide our timeout). The
fixture starts the independent runs together, so their start-ups (torch imports) overlap. The command line is
tested the same way: `torchrun -m minidiffusion train fmnist-ae` (2 processes) against `python -m minidiffusion train
fmnist-ae` (1), and a torchrun run whose launcher and workers are SIGKILLed after its first checkpoint, resumed with
`torchrun ... train --resume`.

Tolerance of "two processes reach the weights of one": 1e-6 absolute on weights of size ~0.1-1 (measured: 3e-8,
float32 rounding). Not bit-exact because the same gradient is summed in another order: one process averages the
8 per-item gradients of a batch in one reduction; two average 4 each, and DistributedDataParallel then averages
the two (and the uneven last batch, 3 + 2 items, is reweighted by 6/5 and 4/5); AdamW carries those last-bit
differences forward. The model has no dropout and no batch norm (per-process batch statistics would be a real
difference, not rounding). The diffusion model (U-Net, EDM, label dropout) gets the same tolerance (measured: bit
identical) against one process that draws each rank's noise from that rank's stream, and so does the classifier
recipe's ResNet (batch norm and dropout: the single process runs each rank's items through it separately and keeps
rank 0's running statistics; measured: bit identical); the MLP autoencoder of the
command-line test (no batch norm: model.norm=false; precision=fp32) too (measured 1.5e-8). Kill-and-resume is
compared bit for bit: it is the same two processes doing the same
sums in the same order, with every rank's RNG restored.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import distributed_harness
from minidiffusion.data.loaders import TensorLoader
from minidiffusion.errors import ConfigError
from minidiffusion.learner import list_checkpoints
from minidiffusion.learner.distributed import (
    ShardedLoader,
    average_gradients,
    distributed_cbs,
    gather,
    is_main,
    launched_by_torchrun,
    local_batch_size,
    rank_seed,
    run_on_main,
    shard_range,
    world,
)

HARNESS = Path(__file__).with_name("distributed_harness.py")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")
N_TRAIN = 45  # the harness's mlp task: batches of 8, the last one of 5


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **extra}


class Run:
    """A harness run (or, with cli=True, `minidiffusion ARGS`) in the background, under torchrun with 2 processes
    unless torchrun=False: `result()` waits for it once and returns (returncode, stdout, stderr)."""

    def __init__(self, args: list[str], env: dict | None = None, torchrun: bool = True, cli: bool = False):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=127.0.0.1:0"] if torchrun else [sys.executable]
        target = ["-m", "minidiffusion"] if cli else [str(HARNESS)]
        self.proc = subprocess.Popen([*launcher, *target, *args], env=env or _env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._result = None

    def result(self, timeout: float = 240) -> tuple[int, str, str]:
        if self._result is None:
            out, err = self.proc.communicate(timeout=timeout)
            self._result = (self.proc.returncode, out, err)
        return self._result

    def ok(self) -> str:
        code, out, err = self.result()
        assert code == 0, err[-4000:]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            distributed_harness.kill_family(self.proc.pid)
            self.proc.communicate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AE = ["train", "fmnist-ae", "epochs=3", "train_limit=4096", "batch_size=64", "model.norm=false", "precision=fp32",
      "--quiet"]  # the course's MLP autoencoder, without batch norm (see the module docstring), in float32


WATCH = """
import sys, time
from minidiffusion.learner.checkpoint import list_checkpoints
sys.path.insert(0, sys.argv[3])
from distributed_harness import kill_family
ckpts, agent, deadline = sys.argv[1], int(sys.argv[2]), time.time() + 240
while time.time() < deadline and not list_checkpoints(ckpts):
    time.sleep(0.005)
kill_family(agent)
"""


def _kill_after_first_checkpoint(run: Run, ckpts: Path) -> subprocess.Popen:
    """Start a process that SIGKILLs `run`'s launcher and all its descendants (the workers) as soon as its first
    checkpoint (end of epoch 0 of 3) exists: polled every 5 ms, an epoch takes seconds."""
    args = [str(ckpts), str(run.proc.pid), str(HARNESS.parent)]
    return subprocess.Popen([sys.executable, "-c", WATCH, *args], env=_env())


def _pair(root: Path, name: str, *args: str) -> list[Run]:
    """Two processes with the environment torchrun would give them, and no agent watching them."""
    port = str(_free_port())
    return [Run(["mlp", str(root / name), str(root / f"{name}-side"), *args],
                env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port), torchrun=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run that depends on no other, started together: mlp in 2 processes (and in 1, in this process,
    meanwhile), the uninterrupted 2-process diffusion run, the one whose rank 1 is SIGKILLed in epoch 2, and the
    two failure pairs (rank 1 raises; rank 1 stalls past a 10 s timeout)."""
    root = tmp_path_factory.mktemp("distributed")
    started = {
        "mlp": Run(["mlp", str(root / "mlp"), str(root / "mlp-side")]),
        "unet": Run(["unet", str(root / "unet"), str(root / "unet-side")]),
        "classifier": Run(["classifier", str(root / "clf"), str(root / "clf-side")]),
        "syncbn": Run(["syncbn", str(root / "sbn"), str(root / "sbn-side")]),
        "ref": Run(["diffusion", str(root / "ref"), str(root / "ref-side")]),
        "killed": Run(["diffusion", str(root / "killed"), str(root / "killed-side"), "--kill", "1,4"]),
        "ae2": Run([*AE, "--out", str(root / "ae2")], cli=True),
        "ae1": Run([*AE, "--out", str(root / "ae1")], torchrun=False, cli=True),
        "ae-killed": Run([*AE, "--out", str(root / "ae-killed")], cli=True),
    }
    watcher = _kill_after_first_checkpoint(started["ae-killed"], root / "ae-killed" / "checkpoints")
    for how, timeout in (("raise", "60"), ("stall", "10")):
        for rank, run in enumerate(_pair(root, how, "--fail", how, "--timeout", timeout)):
            started[f"{how}{rank}"] = run
    distributed_harness.main(["mlp", str(root / "one"), str(root / "one-side")])  # one process, here
    distributed_harness.main(["unet", str(root / "unet-one"), str(root / "unet-one-side"), "--emulate", "2"])
    distributed_harness.main(["classifier", str(root / "clf-one"), str(root / "clf-one-side"), "--emulate", "2"])
    distributed_harness.main(["syncbn", str(root / "sbn-one"), str(root / "sbn-one-side")])  # plain, one process
    yield root, started
    watcher.kill()
    watcher.wait()
    for run in started.values():
        run.stop()


def _report(side: Path, rank: int) -> dict:
    return json.loads((side / f"rank{rank}.json").read_text())


# -- in this process ----------------------------------------------------------------------------------------------
def _loader(n: int = N_TRAIN, bs: int = 8, **kw) -> TensorLoader:
    return TensorLoader(torch.arange(n), batch_size=bs, shuffle=True, seed=3, **kw)


def _epoch(loaders: list[ShardedLoader], epoch: int | None) -> list[list[list[int]]]:
    """[rank][batch] -> item ids of one pass (after set_epoch(epoch) unless epoch is None)."""
    out = []
    for dl in loaders:
        if epoch is not None:
            dl.set_epoch(epoch)
        out.append([b[0].tolist() for b in dl])
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_shards_of_an_epoch_partition_the_global_batches(world_size):
    single = _loader()
    loaders = [ShardedLoader(_loader(), r, world_size) for r in range(world_size)]
    orders = []
    for epoch in (0, 1):
        single.set_epoch(epoch)
        reference = [b[0].tolist() for b in single]
        shards = _epoch(loaders, epoch)
        assert all(len(s) == len(reference) == len(dl) for s, dl in zip(shards, loaders, strict=True))
        for i, batch in enumerate(reference):  # rank r takes items r, r + N, ... of the global batch
            assert [shards[r][i] for r in range(world_size)] == [batch[r::world_size] for r in range(world_size)]
        flat = [i for s in shards for b in s for i in b]
        assert sorted(flat) == list(range(N_TRAIN))  # disjoint, and covering the set
        orders.append([i for s in shards for b in s for i in b])
    assert orders[0] != orders[1]  # the second epoch is reshuffled
    # the last global batch (5 items) splits unevenly: each rank's loss is weighted so each item counts once
    loaders[0].set_epoch(0)
    weights = [loaders[0].batch_weight for _ in loaders[0]]
    assert weights[:-1] == [1.0] * 5 and weights[-1] == pytest.approx(len(range(0, 5, world_size)) * world_size / 5)


def test_a_pass_without_set_epoch_takes_the_next_epoch_and_start_iter_skips_global_batches():
    dl = ShardedLoader(_loader(), 1, 2)
    first, second = _epoch([dl], None)[0], _epoch([dl], None)[0]
    assert first == _epoch([ShardedLoader(_loader(), 1, 2)], 0)[0]
    assert second == _epoch([ShardedLoader(_loader(), 1, 2)], 1)[0] != first  # no forgotten set_epoch
    dl.set_epoch(1)
    dl.start_iter = 4
    assert [b[0].tolist() for b in dl] == second[4:]


def test_a_tiny_last_batch_is_dropped_in_training_and_kept_in_validation():
    train = [ShardedLoader(_loader(41), r, 2) for r in range(2)]  # 5 batches of 8, then 1 item: dropped
    assert [len(dl) for dl in train] == [5, 5]
    assert sorted(i for s in _epoch(train, 0) for b in s for i in b) == sorted(_loader(41).order()[:40].tolist())
    valid = [ShardedLoader(TensorLoader(torch.arange(13), batch_size=6), r, 2, training=False) for r in range(2)]
    assert [len(dl) for dl in valid] == [3, 2]  # the last batch's single item is rank 0's
    assert sorted(i for s in _epoch(valid, None) for b in s for i in b) == list(range(13))


def test_the_global_batch_must_split_evenly():
    with pytest.raises(ConfigError, match="batch_size 10 does not split evenly over 4 processes; choose a multiple"):
        ShardedLoader(_loader(bs=10), 0, 4)
    with pytest.raises(ConfigError, match="batch_size 8 does not split evenly over 3 processes"):
        local_batch_size(8, 3)
    assert local_batch_size(8, 4) == 2
    ShardedLoader(TensorLoader(torch.arange(9), batch_size=5), 0, 4, training=False)  # validation: any size
    with pytest.raises(ConfigError, match="shards in-memory loaders"):
        ShardedLoader([1, 2, 3], 0, 2)


def test_one_process_changes_nothing(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    assert world() == (0, 0, 1) and is_main() and not launched_by_torchrun()
    assert distributed_cbs(seed=3) == []
    x = torch.arange(6.0)
    assert gather(x) is x and shard_range(5) == range(5) and run_on_main(lambda a: a + 1, 1) == 2
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    grad = net.weight.grad.clone()
    average_gradients(net)
    assert torch.equal(net.weight.grad, grad)
    seeds = {(s, w): [rank_seed(s, r, w) for r in range(w)] for s in range(4) for w in (2, 3)}
    assert all(len(set(v)) == len(v) and s not in v for (s, _), v in seeds.items())  # per rank, never the run's


def test_a_bad_launch_environment_is_one_sentence(monkeypatch):
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match=r"RANK='x' is not a whole number; launch the processes with torchrun"):
        world()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="0 <= RANK < WORLD_SIZE"):
        world()


# -- two processes -----------------------------------------------------------------------------------------------
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(runs):
    root, started = runs
    started["mlp"].ok()
    one, two = load_file(root / "one-side" / "rank0.safetensors"), load_file(root / "mlp-side" / "rank0.safetensors")
    assert one.keys() == two.keys()  # the single-process state-dict keys: no "module." prefix
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-6), (k, (one[k] - two[k]).abs().max().item())
    other = load_file(root / "mlp-side" / "rank1.safetensors")
    assert all(torch.equal(two[k], other[k]) for k in two)  # weights and EMA identical in both processes
    r1, r2 = _report(root / "one-side", 0), _report(root / "mlp-side", 0)
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["lrs"] == r1["lrs"] and len(r2["lrs"]) == r2["steps"] == 12  # one-cycle: once per optimizer step
    for a, b in zip(r1["history"], r2["history"], strict=True):  # losses over all ranks = one process's
        assert {k: v for k, v in a.items() if k != "loss"} == {k: v for k, v in b.items() if k != "loss"}
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert r2["history"] == _report(root / "mlp-side", 1)["history"]
    assert torch.allclose(torch.tensor(r2["gathered"]), torch.tensor(r2["direct"]), atol=1e-6)  # gather


def test_a_diffusion_model_in_two_processes_reaches_the_weights_of_one(runs):
    """The U-Net + EDM objective + label dropout + EMA + one-cycle: noise and dropout differ between the ranks
    (per-rank streams), so the single process draws each rank's items' noise from that rank's stream (EmulateRanks)."""
    root, started = runs
    started["unet"].ok()
    one = load_file(root / "unet-one-side" / "rank0.safetensors")
    two = load_file(root / "unet-side" / "rank0.safetensors")
    assert one.keys() == two.keys() and any(k.startswith("ema/") for k in one)
    for k in one:  # measured: bit-identical; 1e-6 allows for another summation order of the same gradients
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-6), (k, (one[k] - two[k]).abs().max().item())
    train = [[r["loss"] for r in _report(side, 0)["history"] if r["phase"] == "train"]
             for side in (root / "unet-one-side", root / "unet-side")]
    assert train[0] == pytest.approx(train[1], rel=1e-6)


def test_the_classifier_recipe_in_two_processes_reaches_the_weights_of_one(runs):
    """classifier_learner's ResNet has batch norm (each process normalises its own items; running statistics
    rank 0's) and dropout (per-rank streams): the single process does both per rank's items (EmulateRanks)."""
    root, started = runs
    started["classifier"].ok()
    one = load_file(root / "clf-one-side" / "rank0.safetensors")
    two = load_file(root / "clf-side" / "rank0.safetensors")
    assert one.keys() == two.keys() and any(k.endswith("running_var") for k in one)
    for k in one:  # measured: bit-identical, batch-norm statistics included
        assert torch.allclose(one[k].double(), two[k].double(), rtol=0, atol=1e-6), k
    other = load_file(root / "clf-side" / "rank1.safetensors")
    assert all(torch.equal(two[k], other[k]) for k in two)
    h1, h2 = _report(root / "clf-one-side", 0)["history"], _report(root / "clf-side", 0)["history"]
    assert [r["accuracy"] for r in h1] == [r["accuracy"] for r in h2]
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-6)


def test_with_sync_bn_two_processes_train_a_batch_norm_model_as_one_process_does(runs):
    """sync_bn: each batch norm normalises with the global batch's statistics (all-reduced sums), so the single
    process needs no emulation: the same weights and running statistics, to float tolerance (the statistics are
    sums of two halves instead of one sum: rounding differs in the last bits, and grows a little over 12 steps)."""
    root, started = runs
    started["syncbn"].ok()
    one = load_file(root / "sbn-one-side" / "rank0.safetensors")
    two = load_file(root / "sbn-side" / "rank0.safetensors")
    assert one.keys() == two.keys() and any(k.endswith("running_var") for k in one)
    for k in one:
        assert torch.allclose(one[k].double(), two[k].double(), rtol=0, atol=1e-5), k
    other = load_file(root / "sbn-side" / "rank1.safetensors")
    assert all(torch.equal(two[k], other[k]) for k in two)  # both processes hold the same statistics
    h1, h2 = _report(root / "sbn-one-side", 0)["history"], _report(root / "sbn-side", 0)["history"]
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-5)


def test_eval_under_torchrun_splits_the_samples_and_scores_them_once():
    """Each process samples its share (balanced labels, noise from seed + its first index) and one FID is scored on
    all of them: the same number as scoring those very images in one process."""
    from minidiffusion.metrics.evaluate import evaluate_samples

    args = ["eval", "--pretrained", "fmnist", "--samples", "40", "--steps", "2", "--precision", "fp32", "--seed", "3"]
    out = Run(args, cli=True).ok()
    lines = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["world_size"] == 2 and lines[0]["n"] == 40  # rank 0 alone prints
    from minidiffusion.pipelines.image import DiffusionModel

    model = DiffusionModel.from_pretrained("fmnist")
    ids = torch.arange(40) % 10
    parts = [model.sample(20, steps=2, labels=ids[a: a + 20].tolist(), seed=3 + a, precision="fp32")[0]
             for a in (0, 20)]
    one = evaluate_samples(torch.cat(parts), seed=3)
    assert lines[0]["fid"] == pytest.approx(one["fid"], rel=1e-6) and lines[0]["kid"] == pytest.approx(one["kid"])


def test_sync_batch_norm_is_plain_batch_norm_in_one_process_and_turns_back():
    from minidiffusion.learner.distributed import SyncBatchNorm, sync_batch_norm

    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(3))
    ref = copy.deepcopy(net)
    undo = sync_batch_norm(net)
    assert isinstance(net[1], SyncBatchNorm) and isinstance(net[2], SyncBatchNorm)
    assert net.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 2, 5, 5)
    assert torch.equal(net[:2](x), ref[:2](x)) and torch.equal(net[1].running_var, ref[1].running_var)
    undo()
    assert type(net[1]) is torch.nn.BatchNorm2d and type(net[2]) is torch.nn.BatchNorm1d


def test_fid_during_training_splits_the_samples_and_scores_them_once(runs):
    root, started = runs
    started["mlp"].ok()
    one, ranks = _report(root / "one-side", 0), [_report(root / "mlp-side", r) for r in (0, 1)]
    assert one["fid_drawn"] == [distributed_harness.N_FID] * 2  # one score per epoch, n samples each
    assert all(r["fid_drawn"] == [distributed_harness.N_FID // 2] * 2 for r in ranks)  # each process: its half
    assert ranks[0]["fid"] == ranks[1]["fid"] == pytest.approx(one["fid"], rel=1e-9)  # the same n samples, once
    records = [json.loads(line) for line in (root / "mlp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["n"] for r in records if r["phase"] == "fid"] == [distributed_harness.N_FID] * 2


def test_only_rank_0_writes_files_and_prints(runs):
    root, started = runs
    out = started["mlp"].ok()
    rank0, rank1 = _report(root / "mlp-side", 0)["writes"], _report(root / "mlp-side", 1)["writes"]
    assert rank1 == []  # no open-for-writing, rename, mkdir or removal under the run directory
    written = {w.split(" ", 1)[1] for w in rank0}
    assert {"metrics.jsonl", "loss.png"} <= written and any(w.startswith("checkpoints/ckpt-") for w in written)
    records = [json.loads(line) for line in (root / "mlp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in records] == [(0, "distributed"), (0, "train"), (0, "valid"), (0, "fid"),
                                                          (1, "train"), (1, "valid"), (1, "fid")]
    assert records[0]["world_size"] == 2 and records[0]["per_process"] == 4
    assert out.count("hello from rank 0") == 1 and "hello from rank 1" not in out
    assert out.count("phase") == 1  # ProgressCB's table header: one table, rank 0's
    assert [p.name for p in list_checkpoints(root / "mlp" / "checkpoints")] == ["ckpt-000004-e0001-i000006",
                                                                                 "ckpt-000005-e0002-i000000"]


def test_under_torchrun_the_shards_are_disjoint_cover_the_set_and_reshuffle(runs):
    root, started = runs
    started["mlp"].ok()
    single = _report(root / "one-side", 0)["ids"]
    ranks = [_report(root / "mlp-side", r)["ids"] for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert [len(x) for x in a] == [4] * 5 + [3] and [len(x) for x in b] == [4] * 5 + [2]
        assert set().union(*a).isdisjoint(set().union(*b))
        assert sorted(i for x in a + b for i in x) == list(range(N_TRAIN))
        for i, batch in enumerate(single[epoch]):  # each global batch is the single process's batch
            assert sorted(a[i] + b[i]) == sorted(batch)
    assert ranks[0]["0"] != ranks[0]["1"] and ranks[1]["0"] != ranks[1]["1"]


def test_sigkill_and_torchrun_resume_equal_the_uninterrupted_run(runs):
    root, started = runs
    code, _, err = started["killed"].result()
    assert code != 0 and "SIGKILL" in err
    names = [p.name for p in list_checkpoints(root / "killed" / "checkpoints")]
    assert names == ["ckpt-000002-e0000-i000006", "ckpt-000003-e0001-i000000", "ckpt-000004-e0001-i000003"]
    resumed = Run(["diffusion", str(root / "killed"), str(root / "killed-side"), "--resume"])
    try:
        out = resumed.ok()
    finally:
        resumed.stop()
    assert out.count("resumed from ckpt-000004-e0001-i000003") == 1  # printed by rank 0 only
    started["ref"].ok()
    ref, got = load_file(root / "ref-side" / "rank0.safetensors"), load_file(root / "killed-side" / "rank0.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:  # bit for bit: model and EMA
        assert torch.equal(ref[k], got[k]), (k, (ref[k] - got[k]).abs().max().item())
    other = load_file(root / "killed-side" / "rank1.safetensors")
    assert all(torch.equal(got[k], other[k]) for k in got)
    assert _report(root / "killed-side", 0)["history"] == _report(root / "ref-side", 0)["history"]


# -- failures ----------------------------------------------------------------------------------------------------
def test_a_process_that_stalls_stops_the_other_after_the_timeout_with_a_sentence(runs):
    _, started = runs
    code, _, err = started["stall0"].result()
    assert started["stall1"].proc.poll() is None  # rank 1 still sleeps (600 s): rank 0 did not hang waiting for it
    assert code != 0
    assert "TrainingError: process 0 of 2 lost the others at epoch 0, batch 2 (Timed out waiting 10000ms" in err
    assert "did not answer within 10 s; the last checkpoint is intact, fix the cause and continue with --resume" in err


def test_a_process_that_raises_stops_the_other_with_a_sentence(runs):
    _, started = runs
    code, _, err = started["raise1"].result()
    assert code != 0 and "RuntimeError: rank 1 fails on purpose" in err
    code, _, err = started["raise0"].result()  # at once: the peer's exit breaks the collective, no timeout needed
    assert code != 0 and "process 0 of 2 lost the others at epoch 0, batch 2 (Connection closed by peer" in err


def test_rank_0s_refusal_reaches_every_process(runs):
    root, started = runs
    started["mlp"].ok()
    for rank in (0, 1):
        assert _report(root / "mlp-side", rank)["refusal"] == ("runs/x already holds a run (checkpoints/); "
                                                               "pass --resume to continue it")


# -- the command line under torchrun -------------------------------------------------------------------------------
@pytest.mark.integration
def test_minidiffusion_train_under_torchrun_gives_the_one_process_model_and_one_summary(runs, fashion_mnist_dir):
    root, started = runs
    out2, out1 = started["ae2"].ok(), started["ae1"].ok()
    one, two = load_file(root / "ae1" / "model.safetensors"), load_file(root / "ae2" / "model.safetensors")
    assert one.keys() == two.keys()
    for k in one:  # measured 1.5e-8 on weights up to 0.08: float32 sums in another order
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-6), (k, (one[k] - two[k]).abs().max().item())
    summaries = [json.loads(line) for line in out2.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2  # printed by rank 0 only
    assert json.loads(out1.strip().splitlines()[-1])["world_size"] == 1
    assert summaries[0]["train_loss"] == pytest.approx(json.loads(out1.strip().splitlines()[-1])["train_loss"],
                                                       rel=1e-5)
    assert sorted(p.name for p in (root / "ae2").iterdir()) == sorted(p.name for p in (root / "ae1").iterdir())
    config = (root / "ae2" / "config.toml").read_text()
    assert config.startswith("# trained by world_size = 2 processes") and "world_size" not in (
        root / "ae1" / "config.toml").read_text()
    records = [json.loads(line) for line in (root / "ae2" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["phase"] == "distributed" and records[0]["world_size"] == 2
    assert [r["phase"] for r in records[1:]] == ["train", "valid"] * 3


@pytest.mark.integration
def test_a_sigkilled_torchrun_training_resumes_with_torchrun_to_the_same_model(runs, fashion_mnist_dir):
    root, started = runs
    code, _, _ = started["ae-killed"].result()
    assert code == -signal.SIGKILL
    names = [p.name for p in list_checkpoints(root / "ae-killed" / "checkpoints")]
    assert names and not any("-e0003-" in n for n in names), names  # killed after epoch 1 or 2 of 3
    assert not (root / "ae-killed" / "model.safetensors").exists()
    resumed = Run(["train", "--resume", "--out", str(root / "ae-killed"), "--quiet"], cli=True)
    try:
        out = resumed.ok()
    finally:
        resumed.stop()
    assert json.loads(out.strip().splitlines()[-1])["world_size"] == 2
    started["ae2"].ok()
    ref, got = load_file(root / "ae2" / "model.safetensors"), load_file(root / "ae-killed" / "model.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit


def test_every_recipe_trains_through_the_distributed_helpers():
    """Each recipe's train function starts its run with start_run, gives its Learner training_cbs (directly or through
    diffusion_learner) and leaves the results to rank 0: what makes it train as one model under torchrun."""
    from minidiffusion.recipes import RECIPES

    missing = {}
    for name, recipe in RECIPES.items():
        fn, module = inspect.getsource(recipe.train), inspect.getsource(inspect.getmodule(recipe.train))
        lacking = [k.rstrip("(") for k in ("start_run(", "is_main()") if k not in fn]
        if "training_cbs(" not in module and "diffusion_learner(" not in fn:
            lacking.append("training_cbs")
        if lacking:
            missing[name] = lacking
    assert not missing, "; ".join(f"recipe {n} lacks {', '.join(v)} (see recipes/common.py and docs/distributed.md)"
                                  for n, v in missing.items())


def test_a_recipe_that_trained_without_distributedcb_is_a_sentence(monkeypatch):
    from minidiffusion.errors import TrainingError
    from minidiffusion.recipes.common import check_trained_together

    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    check_trained_together("x", 0)  # one process: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="the x recipe trained without DistributedCB, so each of the 2 processes"):
        check_trained_together("x", 0)

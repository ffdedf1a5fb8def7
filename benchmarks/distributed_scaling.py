"""Scaling of `minidiffusion train` over processes: images/s of a preset's training steps, and the communication share.

Three cases, each timing `--steps` training steps of the preset (default `fmnist`, the default diffusion preset, at its
global batch_size) after `--warmup` steps, through the recipe's own Learner (`diffusion_learner`: DiffusionCB, EMA,
one-cycle, and DistributedCB under torchrun), precision fp32 unless --precision says otherwise:

  1x{T}      one process with T = --threads x --nproc threads
  {N}x1      N processes with 1 thread each under torchrun (gloo on a CPU, NCCL on GPUs): DistributedDataParallel
  {N}x1-solo the same N processes, each training its own copy on batch_size / N items without any communication:
             the compute the N processes do, so 1 - solo / DDP time per step is the communication (and waiting) share

Every case runs --repeats times, interleaved, and the median step time is reported. It prints a table and writes
JSON (--json). On a shared machine the absolute numbers move with the load (the load average is recorded).

    python benchmarks/distributed_scaling.py --steps 6 --warmup 2 --repeats 3 \
        --json benchmarks/results/distributed_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args) -> None:
    """One process of a case: time the steps, rank 0 (or each solo process) writes {"step_seconds": [...]}."""
    from minidiffusion.device import resolve_device
    from minidiffusion.learner import Callback, CancelFitException
    from minidiffusion.learner.distributed import init_distributed, world
    from minidiffusion.nn.unet import UNet
    from minidiffusion.recipes import load_config
    from minidiffusion.recipes.diffusion import diffusion_learner, load_training_data, resolve_config

    torch.set_num_threads(args.threads)
    init_distributed()
    rank, _, size = world()
    overrides = [f"precision={args.precision}", f"batch_size={args.batch_size}", "fid_every=0",
                 f"train_limit={args.batch_size * (args.warmup + args.steps)}", "valid_limit=64", *args.overrides]
    _, cfg = load_config(args.preset, overrides)
    data = load_training_data(cfg)
    cfg = resolve_config(cfg, data)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)

    class Clock(Callback):
        order = 100

        def before_fit(self, learn):
            self.times, self.t = [], None

        def before_batch(self, learn):
            if learn.training:
                torch.cuda.synchronize() if device.type == "cuda" else None
                self.t = time.perf_counter()

        def after_batch(self, learn):
            if learn.training:
                torch.cuda.synchronize() if device.type == "cuda" else None
                self.times.append(time.perf_counter() - self.t)
                if len(self.times) == args.warmup + args.steps:
                    raise CancelFitException()

    learn = diffusion_learner(cfg, UNet(cfg.model), data.dls, device, out=None, progress=False)
    clock = Clock()
    learn.cbs.append(clock)
    learn.fit(1, valid=False)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_seconds": clock.times[args.warmup:], "world_size": size,
                                              "batch_size": args.batch_size}))


def run_case(name: str, nproc: int, threads: int, batch: int, args, tmp: Path) -> list[float]:
    """Run one case once; return its step times (seconds; the slowest solo process's for a solo case)."""
    common = ["--worker", "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--threads", str(threads), "--precision", args.precision, *sum((["--set", o] for o in args.overrides),
                                                                             [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    me = [sys.executable, str(Path(__file__).resolve())]
    if name.endswith("solo"):
        outs = [tmp / f"{name}-{r}.json" for r in range(nproc)]
        procs = [subprocess.Popen([*me, *common, "--batch-size", str(batch // nproc), "--out", str(o)], env=env)
                 for o in outs]
        if any(p.wait() for p in procs):
            raise SystemExit(f"case {name} failed")
        per = [json.loads(o.read_text())["step_seconds"] for o in outs]
        return [max(s) for s in zip(*per, strict=True)]
    out = tmp / f"{name}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=127.0.0.1:0", str(Path(__file__).resolve())] if nproc > 1 else me
    if subprocess.run([*launcher, *common, "--batch-size", str(batch), "--out", str(out)], env=env).returncode:
        raise SystemExit(f"case {name} failed")
    return json.loads(out.read_text())["step_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fmnist")
    p.add_argument("--nproc", type=int, default=2, help="processes of the multi-process cases")
    p.add_argument("--threads", type=int, default=1, help="threads per process (the single process gets nproc x)")
    p.add_argument("--batch-size", type=int, default=0, help="global batch (0: the preset's)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a key=value override (repeatable)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from minidiffusion.recipes import load_config

    batch = args.batch_size or load_config(args.preset)[1].batch_size
    n, t = args.nproc, args.threads
    cases = [(f"1x{n * t}", 1, n * t), (f"{n}x{t}", n, t), (f"{n}x{t}-solo", n, t)]
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    load = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeats):
            for name, nproc, threads in cases:
                load.append(os.getloadavg()[0])
                times[name] += run_case(name, nproc, threads, batch, args, Path(d))
    med = {k: statistics.median(v) for k, v in times.items()}
    single, ddp, solo = med[cases[0][0]], med[cases[1][0]], med[cases[2][0]]
    rows = [{"case": cases[0][0], "processes": 1, "threads_each": n * t, "step_s": single,
             "images_per_s": batch / single},
            {"case": cases[1][0], "processes": n, "threads_each": t, "step_s": ddp, "images_per_s": batch / ddp,
             "speedup": single / ddp, "communication_share": max(0.0, 1 - solo / ddp)},
            {"case": cases[2][0], "processes": n, "threads_each": t, "step_s": solo, "images_per_s": batch / solo,
             "note": "no communication: each process its own copy on batch/N"}]
    print(f"{args.preset}, global batch {batch}, {args.precision}, {args.steps} timed steps x {args.repeats} repeats "
          f"(median), load average {statistics.mean(load):.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<12}{'procs x threads':>16}{'s/step':>9}{'images/s':>10}{'speedup':>9}{'comm. share':>13}")
    for r in rows:
        speedup = r.get("speedup", 1.0) if r["case"] != cases[2][0] else float("nan")
        print(f"{r['case']:<12}{r['processes']:>8} x {r['threads_each']:<6}{r['step_s']:>9.3f}"
              f"{r['images_per_s']:>10.1f}{speedup:>9.2f}{r.get('communication_share', float('nan')):>13.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "preset": args.preset, "batch_size": batch, "precision": args.precision, "steps": args.steps,
            "warmup": args.warmup, "repeats": args.repeats, "rows": rows, "step_seconds": times,
            "load_average": statistics.mean(load), "cpus": os.cpu_count(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}, indent=1))


if __name__ == "__main__":
    main()

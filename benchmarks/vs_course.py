"""Our default recipe against the course's, each trained for the same wall-clock budget, in one run.

(a) course: diffusers' UNet2DModel(block_out_channels=(32, 64, 128, 256), norm_num_groups=8,
    diffusers' default block types as in the lesson-19 notebook), epsilon objective with linear
    betas 1e-4..0.02 (T=1000), AdamW eps=1e-5 with a one-cycle LR, unconditional; sampled with
    DDIM (eta=0) in 100 steps.
(b) ours: the default preset `fmnist` (our U-Net, EDM preconditioning, class-conditional with
    label dropout); sampled with DPM-Solver++(2M) in 20 steps (labels balanced over the classes).

Both train on Fashion-MNIST under `TimeBudgetCB(minutes)` (one-cycle over the clock, only
training time counts) on the same machine, one after the other, then both are scored with
FID/KID on the same number of samples against the test set, next to the reals floor. Each
network samples in the precision it trained in (ours: bf16 where fast; the course's: fp32).
`--save DIR` keeps both EMA models (DIR/ours, DIR/course) for later sampling or shipping.

`--parallel` trains the two recipes at the same time instead, each in its own process with one
thread (logs in DIR/NAME/train.log), so both see the same machine at the same moment and M
minutes of wall clock cover both; the sampling and scoring then run in this process with all
threads. On a noisy shared machine this is the fairer comparison.

    python benchmarks/vs_course.py --minutes 20 --n 2048
    python benchmarks/vs_course.py --minutes 90 --n 500 --parallel --save runs/vs90

Needs diffusers (`pip install -e '.[dev]'`). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from minidiffusion.config import apply_overrides, from_dict, load_preset
from minidiffusion.learner import EMACB, TimeBudgetCB, default_device
from minidiffusion.learner.precision import precision_of
from minidiffusion.metrics.evaluate import evaluate_samples, reals_floor, reference_features
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.image import DiffusionModel, save_model
from minidiffusion.recipes.common import fit_epochs
from minidiffusion.recipes.diffusion import DiffusionConfig, diffusion_learner, load_training_data, resolve_config


class DiffusersNet(nn.Module):
    """Adapt diffusers' UNet2DModel to our network signature net(x_in, noise_level) -> tensor."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, label: torch.Tensor | None = None):
        return self.unet(x, noise_level).sample


def course_network() -> nn.Module:
    """Return the course's lesson-19 U-Net (15.9 M parameters) wrapped as our network."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise SystemExit(f"vs_course needs diffusers (pip install -e '.[dev]'): {e}") from None
    return DiffusersNet(UNet2DModel(sample_size=32, in_channels=1, out_channels=1,
                                    block_out_channels=(32, 64, 128, 256), norm_num_groups=8))


def train_for(cfg: DiffusionConfig, net: nn.Module | None, device: torch.device) -> tuple[DiffusionModel, dict]:
    """Train for cfg.minutes; return (a DiffusionModel on the EMA weights, {steps, images, seconds, params})."""
    data = load_training_data(cfg)
    cfg = resolve_config(cfg, data)
    torch.manual_seed(cfg.seed)
    net = net if net is not None else UNet(cfg.model)
    learn = diffusion_learner(cfg, net, data.dls, device)
    learn.fit(fit_epochs(cfg))
    budget = learn.cb(TimeBudgetCB)
    info = {"steps": budget.steps, "images": budget.steps * cfg.batch_size, "train_seconds": round(budget.seconds, 1),
            "params": sum(p.numel() for p in net.parameters()), "precision": precision_of(learn)}
    return DiffusionModel(learn.cb(EMACB).ema_model, cfg, data.class_names, device), info


def train_arms_in_parallel(args: argparse.Namespace, save: Path) -> dict[str, dict]:
    """Train both recipes at once, one single-threaded child process each; return {name: train info}."""
    procs = {}
    for name in ("course", "ours"):
        (save / name).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--arm", name, "--minutes", str(args.minutes), "--save", str(save),
               "--seed", str(args.seed), "--course-batch-size", str(args.course_batch_size),
               "--course-precision", args.course_precision]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = open(save / name / "train.log", "w")  # noqa: SIM115 (closed below, after the child ends)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        print(f"== training {name} for {args.minutes} min in its own process (log: {save / name / 'train.log'})",
              flush=True)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(f"{name} (exit {proc.returncode}, see {save / name / 'train.log'})")
        log.close()
    if failed:
        raise SystemExit(f"vs_course: training failed for {', '.join(failed)}")
    return {name: json.loads((save / name / "train.json").read_text()) for name in procs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="training budget for EACH recipe")
    p.add_argument("--n", type=int, default=2048, help="samples per model (and reals for the floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--course-batch-size", type=int, default=128)
    p.add_argument("--course-precision", default="fp32", help="fp32 is the course net's fastest on CPU")
    p.add_argument("--features", default=None)
    p.add_argument("--save", default=None, help="folder to write both trained models into (ours/, course/)")
    p.add_argument("--json", default="benchmarks/results/vs_course.json")
    p.add_argument("--parallel", action="store_true",
                   help="train both recipes at once, one thread each (needs --save)")
    p.add_argument("--arm", choices=("course", "ours"), help=argparse.SUPPRESS)  # a --parallel child
    args = p.parse_args()
    if (args.parallel or args.arm) and not args.save:
        p.error("--parallel needs --save DIR (the two training processes hand their models over through it)")
    device = default_device()
    m = f"minutes={args.minutes}"
    course_cfg = apply_overrides(from_dict(DiffusionConfig, load_preset("fmnist-ddpm")),
                                 [m, f"batch_size={args.course_batch_size}", f"precision={args.course_precision}",
                                  "channels_last=false", "sampler=ddim", "steps=100"])
    ours_cfg = apply_overrides(from_dict(DiffusionConfig, load_preset("fmnist")), [m])
    cfgs = {"course": course_cfg, "ours": ours_cfg}
    if args.arm:  # child of --parallel: train, hand the model and its numbers over, stop
        torch.set_num_threads(1)
        model, info = train_for(cfgs[args.arm], course_network() if args.arm == "course" else None, device)
        out = Path(args.save) / args.arm
        save_model(model.net, model.cfg, model.class_names, out / "model.safetensors")
        (out / "train.json").write_text(json.dumps({**info, "threads": torch.get_num_threads()}))
        return
    parallel = train_arms_in_parallel(args, Path(args.save)) if args.parallel else {}

    features = load_feature_network(args.features)
    reference = reference_features(features)
    floor = reals_floor(features, args.n, args.seed, reference)

    rows = []
    for name, cfg in cfgs.items():
        if parallel:
            weights = Path(args.save) / name / "model.safetensors"
            model = DiffusionModel.from_file(weights, device=device, net=course_network() if name == "course" else None)
            info = parallel[name]
        else:
            print(f"== training {name} for {args.minutes} min", flush=True)
            model, info = train_for(cfg, course_network() if name == "course" else None, device)
            if args.save:
                save_model(model.net, model.cfg, model.class_names, Path(args.save) / name / "model.safetensors")
        start = time.time()
        x, _ = model.sample(args.n, seed=args.seed, precision=info["precision"])  # each samples as it trained
        scores = evaluate_samples(x, features, with_reals=False, seed=args.seed, reference=reference)
        rows.append({"recipe": name, "sampler": cfg.sampler, "steps": cfg.steps, "nfe": model.nfe(), **info,
                     **scores, "sample_seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)

    print("| recipe | params | steps x batch | sampler | NFE | FID | KID x 1e3 |\n|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['params'] / 1e6:.2f} M | {r['steps']} x {r['images'] // max(r['steps'], 1)} | "
              f"{r['sampler']} | {r['nfe']} | {r['fid']:.2f} | {1e3 * r['kid']:.1f} |")
    print(f"reals floor at N={args.n}: FID {floor['fid']:.2f}, KID x 1e3 {1e3 * floor['kid']:.1f}")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "parallel": args.parallel,
           "torch": torch.__version__, "device": str(device), "minutes": args.minutes, "n": args.n,
           "seed": args.seed, "floor": floor, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({"json": args.json}))


if __name__ == "__main__":
    main()

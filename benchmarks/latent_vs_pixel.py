"""Latent against pixel diffusion on the emoji, each trained for the same wall-clock budget, side by side.

`emoji-pixel` (the U-Net on 64x64x3 images) and `emoji-latent` (the same recipe on the emoji-vae's
16x16x4 latents) train at the same time for `--minutes` of training time each, one process and one
thread each, so both see the same machine at the same moment. Then each samples `--n` images
(DPM-Solver++(2M), 20 steps) scored with FID and KID against the 368 held-out emoji in the emoji
classifier's feature space, beside the reals floor (N real training emoji scored the same way).
The VAE's own training time is not in the budget: it is stated from its run.

    python benchmarks/latent_vs_pixel.py --minutes 30 --latents runs/emoji-latents --out runs/lvp30

`--arms` picks other recipes to put side by side the same way, e.g. lesson 25's "simple diffusion"
(a stack of transformer blocks as the U-Net's middle, 3 blocks: 12.8 M parameters against the
ResBlock middle's 12.4 M) against today's ResBlock + attention middle, both on the latents:

    python benchmarks/latent_vs_pixel.py --arms latent latent-transformer --minutes 15 --out runs/mid15 \
        --json benchmarks/results/simple_diffusion.json

Prints a markdown table and writes JSON.
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

from minidiffusion.metrics.evaluate import default_feature_network, evaluate_model, reals_floor, reference_features
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.pipelines.image import DiffusionModel


def train(name: str, preset: str, out: Path, minutes: float, extra: list[str]) -> subprocess.Popen:
    """Start `minidiffusion train PRESET` for `minutes` in its own single-threaded process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
    cmd = [sys.executable, "-m", "minidiffusion", "train", preset, "--out", str(out / name), "--replace",
           "--quiet", f"minutes={minutes}", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training budget for EACH recipe")
    p.add_argument("--latents", default="runs/emoji-latents", help="folder written by `minidiffusion encode`")
    p.add_argument("--n", type=int, default=1000, help="samples per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default=None, help="feature network (default: the shipped emoji classifier)")
    p.add_argument("--out", default="runs/latent-vs-pixel")
    p.add_argument("--skip-training", action="store_true", help="score the runs already in --out")
    p.add_argument("--json", default="benchmarks/results/latent_vs_pixel.json")
    p.add_argument("--arms", nargs=2, default=["pixel", "latent"], choices=["pixel", "latent", "latent-transformer"],
                   help="the two recipes to compare (the ratio printed is second / first)")
    args = p.parse_args()
    out = Path(args.out)
    recipes = {"pixel": ("emoji-pixel", []), "latent": ("emoji-latent", [f"latents={args.latents}"]),
               "latent-transformer": ("emoji-latent", [f"latents={args.latents}", "model.mid_type=transformer",
                                                       "model.mid_blocks=3"])}
    arms = {name: recipes[name] for name in args.arms}
    start = time.time()
    if not args.skip_training:
        procs = {name: train(name, preset, out, args.minutes, extra) for name, (preset, extra) in arms.items()}
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"training {name} failed; see {out / name}.log")
    wall = time.time() - start
    features = load_feature_network(args.features) if args.features else default_feature_network("emoji")
    reference = reference_features(features, "emoji")
    floor = reals_floor(features, min(args.n, 3287), args.seed, reference, "emoji")
    rows = []
    for name in arms:
        summary = json.loads((out / f"{name}.log").read_text().strip().splitlines()[-1])
        model = DiffusionModel.from_run(out / name)
        res = evaluate_model(model, n=args.n, seed=args.seed, feature_net=features, precision="auto")
        rows.append({"recipe": name, "params": summary["params"], "steps": summary["steps"],
                     "train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
                     "fid": res["fid"], "kid": res["kid"], "kid_std": res["kid_std"], "sample_seconds": res["seconds"]})
    print(f"| recipe | params | steps | training s | images/s | FID (n={args.n}) | KID | sampling+scoring s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['params']:,} | {r['steps']:,} | {r['train_seconds']} | {r['images_per_second']} | "
              f"{r['fid']:.3f} | {r['kid']:.2e} | {r['sample_seconds']} |")
    print(f"reals floor (n={min(args.n, 3287)} training emoji): FID {floor['fid']:.3f}, KID {floor['kid']:.2e}; "
          f"ratio {args.arms[1]}/{args.arms[0]} images/s: "
          f"{rows[1]['images_per_second'] / rows[0]['images_per_second']:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"arms": args.arms, "minutes": args.minutes, "n": args.n, "seed": args.seed,
                                           "rows": rows,
                                           "floor": floor, "wall_seconds": round(wall, 1),
                                           "machine": platform.processor() or platform.machine(),
                                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()

"""Sampling throughput of the shipped U-Net: network evaluations per second, fp32 vs bf16, NCHW vs channels_last.

One denoiser call on a batch of `--batch` labelled images at sigma 1, timed over `--iters`
calls after one warm-up, for each memory format x precision, on `--device` (cuda > mps > cpu by
default), with the same autocast wrapper sampling uses. Prints a markdown table, writes JSON.

    python benchmarks/sampling_speed.py --batch 250 --iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from minidiffusion.learner import resolve_device, synchronize
from minidiffusion.pipelines.image import DiffusionModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default="fmnist")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="benchmarks/results/sampling_speed.json")
    args = p.parse_args()
    device = resolve_device(args.device)
    dm = DiffusionModel.from_pretrained(args.pretrained, device=device)
    labels = torch.arange(args.batch) % dm.cfg.model.n_classes if dm.cfg.model.n_classes else None
    x, sigma = torch.randn(args.batch, 1, 32, 32, device=device), torch.ones(args.batch, device=device)
    rows = []
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        dm.net.to(memory_format=fmt)
        for prec in ("fp32", "bf16"):
            den = dm.denoiser(labels, precision=prec)
            with torch.no_grad():
                den(x, sigma)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.iters):
                    den(x, sigma)
                synchronize(device)
                rate = args.batch * args.iters / (time.perf_counter() - start)
            rows.append({"format": fmt_name, "precision": prec, "evals_per_s": round(rate, 1)})
    print("| memory format | fp32 | bf16 |\n|---|---:|---:|")
    for f in ("NCHW", "channels_last"):
        r = {x["precision"]: x["evals_per_s"] for x in rows if x["format"] == f}
        print(f"| {f} | {r['fp32']:.0f} | {r['bf16']:.0f} |")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "device": str(device), "batch": args.batch, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

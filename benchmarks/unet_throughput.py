"""U-Net throughput: our default `UNet` against the course's diffusers `UNet2DModel`, in one process.

Measures training images/s (forward + backward + AdamW step, MSE loss) and sampling evaluations/s
(forward only, no grad) at batch 128 on 1x32x32 inputs, in float32 and under bf16 autocast.
The cases run interleaved (every repeat times every case once) and the median over repeats is
reported, because these machines are shared and noisy; ratios ours/course are what to compare.

Baselines (diffusers' UNet2DModel, block_out_channels=(32, 64, 128, 256), norm_num_groups=8):
  course       the course's lesson-19 notebook (DDPM_v3): no block types given, so diffusers' defaults
               DownBlock2D + 3x AttnDownBlock2D (attention at 16x16, 8x8, 4x4), layers_per_block=2
  course-lite  the same with attention only at 8x8 and 4x4 (DownBlock2D x2, AttnDownBlock2D x2)

    python benchmarks/unet_throughput.py --threads 1 --warmup 1 --iters 1 --repeats 3 [--channels-last]

On a machine shared with other jobs prefer --threads 1: two OpenMP threads competing with other
processes wait on each other at every op, which penalises the net with more, smaller ops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from minidiffusion.learner import synchronize
from minidiffusion.nn.unet import UNet

COURSE_BLOCKS = {
    "course": (("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
               ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "course-lite": (("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                    ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


class DiffusersUNet(nn.Module):
    """UNet2DModel with our calling convention: (x, noise_level) -> tensor shaped like x."""

    def __init__(self, down: tuple[str, ...], up: tuple[str, ...]):
        super().__init__()
        from diffusers import UNet2DModel
        self.net = UNet2DModel(sample_size=32, in_channels=1, out_channels=1,
                               block_out_channels=(32, 64, 128, 256), norm_num_groups=8,
                               down_block_types=down, up_block_types=up)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        return self.net(x, noise_level).sample


def build_models() -> dict[str, nn.Module]:
    """Our default UNet, plus the diffusers baselines when diffusers can be imported."""
    models: dict[str, nn.Module] = {"ours": UNet()}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed (`.venv/bin/pip install -c constraints.txt diffusers`), "
              "so only our U-Net is measured and no ratio is reported.")
        return models
    for name, (down, up) in COURSE_BLOCKS.items():
        models[name] = DiffusersUNet(down, up)
    return models


def make_step(model: nn.Module, mode: str, amp: bool, args: argparse.Namespace) -> Callable[[], None]:
    """A closure running one training step or one sampling evaluation on a fixed random batch."""
    dev = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 32, 32, generator=g).to(dev, memory_format=fmt)
    target = torch.randn(x.shape, generator=g).to(dev)
    t = (torch.rand(args.batch, generator=g) * 999).to(dev)
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)
    if mode == "sample":
        def step():
            with torch.no_grad(), autocast:
                fwd(x, t)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-5)

    def step():
        with autocast:
            out = fwd(x, t)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and write JSON. Returns the results dict."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per case before timing")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per case per repeat")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; median reported")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--models", default="ours,course,course-lite", help="comma-separated subset")
    ap.add_argument("--json", default="benchmarks/results/unet_throughput.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {k: v for k, v in build_models().items() if k in args.models.split(",")}
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in models.values():
        m.to(args.device, memory_format=fmt).train()
    cases = {(name, mode, prec): make_step(m, mode, prec == "bf16", args)
             for name, m in models.items() for mode in ("train", "sample") for prec in ("fp32", "bf16")}
    for step in cases.values():
        for _ in range(args.warmup):
            step()
    rates: dict[tuple[str, str, str], list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for key, step in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            synchronize(args.device)
            rates[key].append(args.batch * args.iters / (time.perf_counter() - t0))
    median = {k: statistics.median(v) for k, v in rates.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}

    cols = [(mode, prec) for mode in ("train", "sample") for prec in ("fp32", "bf16")]
    flags = "".join([", channels_last"] * args.channels_last + [", compiled"] * args.compile)
    print(f"images/s, batch {args.batch}, 1x32x32, median of {args.repeats} interleaved repeats x "
          f"{args.iters} steps ({args.device}, {torch.get_num_threads()} threads{flags})")
    print(f"{'model':<12} {'params':>10} " + " ".join(f"{m + ' ' + p:>12}" for m, p in cols))
    for name in models:
        print(f"{name:<12} {params[name]:>10,} " + " ".join(f"{median[name, m, p]:>12.1f}" for m, p in cols))
    ratios = {base: {f"{m}_{p}": median["ours", m, p] / median[base, m, p] for m, p in cols}
              for base in models if base != "ours" and "ours" in models}
    for base, r in ratios.items():
        print(f"{'ours/' + base:<23} " + " ".join(f"{r[f'{m}_{p}']:>11.2f}x" for m, p in cols))

    result = {"batch": args.batch, "shape": [1, 32, 32], "device": args.device,
              "threads": torch.get_num_threads(), "channels_last": args.channels_last,
              "compile": args.compile, "warmup": args.warmup,
              "iters": args.iters, "repeats": args.repeats, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "params": params,
              "images_per_s": {name: {f"{m}_{p}": median[name, m, p] for m, p in cols} for name in models},
              "repeats_images_per_s": {f"{n}/{m}/{p}": v for (n, m, p), v in rates.items()},
              "ratio_ours_over": ratios}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

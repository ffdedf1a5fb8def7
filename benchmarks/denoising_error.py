"""How well a diffusion model denoises held-out images at each of its sampling noise levels, and what its sampler
then does with those estimates.

For each sigma of the model's own sampling schedule (a spread of them): the MSE of its estimate x0_hat of held-out
images x0 from x0 + sigma * eps, as it comes and clamped to [-1, 1], beside the MSE of predicting the held-out
mean image (a network that knows nothing but the data's average). An epsilon-predicting network's x0 error is
its epsilon error times sigma, so at the top of DDPM's schedule (sigma 157) it can be hundreds of times the
mean's. Then one sampling run (the model's sampler and steps, balanced labels) with and without clamping: the
standard deviation of the sampler's state x at each level against sqrt(sigma^2 + var(x0)), the spread it should
have, and how much of the final picture sits at the top of the range (x > 0.99, beside the held-out images'
share: the background and a spectrogram's silence are -1, so noise shows at +1). Models: run directories or
shipped names. Prints markdown tables, writes JSON.

    python benchmarks/denoising_error.py runs/instruments-course --n 40
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
from pathlib import Path

import torch

from minidiffusion.metrics.evaluate import real_images
from minidiffusion.pipelines.image import DiffusionModel

SATURATED = 0.99


def load(name: str) -> DiffusionModel:
    """Return the model a run directory or a shipped name points to."""
    return DiffusionModel.from_run(name) if Path(name).is_dir() else DiffusionModel.from_pretrained(name)


def with_clip(model: DiffusionModel, clip_sample: bool) -> DiffusionModel:
    """Return a shallow copy of `model` (the same network) that samples with `clip_sample`."""
    out = copy.copy(model)
    out.cfg = dataclasses.replace(model.cfg, clip_sample=clip_sample)
    return out


def level_indices(n_sigmas: int, k: int) -> list[int]:
    """Return k indices spread over 0 .. n_sigmas - 1, denser near the top (first and last always included)."""
    if k >= n_sigmas:
        return list(range(n_sigmas))
    return sorted({round((n_sigmas - 1) * (i / (k - 1)) ** 2) for i in range(k)})


@torch.no_grad()
def errors_by_sigma(model: DiffusionModel, x0: torch.Tensor, labels: torch.Tensor | None, sigmas: list[float],
                    seed: int = 0) -> list[dict]:
    """Return per sigma {sigma, mse, mse_clamped, mse_mean}: the x0 estimate's MSE on held-out x0 [N, C, S, S]
    in [-1, 1] (raw and clamped to [-1, 1]) and that of the held-out mean image."""
    model = with_clip(model, False)
    d = model.denoiser(labels)
    mean_mse = float((x0 - x0.mean(0, keepdim=True)).pow(2).mean())
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in sigmas:
        x = x0 + s * torch.randn(x0.shape, generator=g)
        est = d(x.to(model.device), torch.full((len(x0),), s, device=model.device)).cpu()
        rows.append({"sigma": s, "mse": float((est - x0).pow(2).mean()),
                     "mse_clamped": float((est.clamp(-1, 1) - x0).pow(2).mean()), "mse_mean": mean_mse})
    return rows


@torch.no_grad()
def sampling_spread(model: DiffusionModel, n: int, var_x0: float, at: list[int], seed: int = 0) -> dict:
    """Return {std: [(sigma, std of the state x there, expected sqrt(sigma^2 + var_x0))] after the steps `at` (sigma:
    where each step ends), saturated: the fraction of final pixels with x > 0.99} of one sampling run of n images."""
    seen = []

    def record(info):
        if info["i"] in at:
            s = info["sigma_next"]
            seen.append((s, float(info["x"].float().std()), math.sqrt(s**2 + var_x0)))

    images, _ = model.sample(n, seed=seed, callback=record)
    return {"std": seen, "saturated": saturated(images)}


def saturated(images: torch.Tensor) -> float:
    """Return the fraction of pixels of images in [-1, 1] with x > 0.99 (the top of the range)."""
    return float((images > SATURATED).float().mean())


def markdown(name: str, rows: list[dict], runs: dict[str, dict], held_out_saturated: float) -> str:
    """Return the two tables of one model: errors by sigma; the sampler's spread without and with clamping."""
    lines = [f"`{name}`: x0 estimate on held-out images", "",
             "| sigma | MSE | MSE, clamped to [-1, 1] | MSE of the mean image | MSE / mean's |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sigma']:.3g} | {r['mse']:.4g} | {r['mse_clamped']:.4g} | {r['mse_mean']:.4g} | "
                     f"{r['mse'] / r['mse_mean']:.3g} |")
    lines += ["", "| sigma (after the step) | expected std of x | " + " | ".join(f"std of x, {k}" for k in runs) + " |",
              "|---:|---:|" + "---:|" * len(runs)]
    first = next(iter(runs.values()))["std"]
    for i, (s, _, want) in enumerate(first):
        lines.append(f"| {s:.3g} | {want:.3g} | " + " | ".join(f"{r['std'][i][1]:.3g}" for r in runs.values()) + " |")
    shares = " | ".join(f"{100 * r['saturated']:.1f}%" for r in runs.values())
    lines.append(f"| final pixels above 0.99 (held-out images: {100 * held_out_saturated:.1f}%) | | {shares} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="run directories or shipped names")
    ap.add_argument("--n", type=int, default=40, help="held-out images for the errors")
    ap.add_argument("--levels", type=int, default=8, help="sigmas of the sampling schedule to score")
    ap.add_argument("--samples", type=int, default=8, help="images of the sampling runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/denoising_error.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for name in args.models:
        model = load(name)
        x0, labels = real_images("test", args.n, data=model.cfg.data)
        if not model.cfg.model.n_classes:
            labels = None
        sampler, steps, _ = model.settings()
        sig = model.sigmas(steps, sampler)[:-1].tolist()
        at = level_indices(len(sig), args.levels)
        rows = errors_by_sigma(model, x0, labels, [sig[i] for i in at])
        var = float(x0.var())
        runs = {f"clip_sample={c}": sampling_spread(with_clip(model, c), args.samples, var, at) for c in (False, True)}
        print(markdown(name, rows, runs, saturated(x0)), "\n")
        out.append({"model": name, "sampler": sampler, "steps": steps, "n": args.n, "errors": rows, "runs": runs,
                    "held_out_saturated": saturated(x0)})
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "models": out}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

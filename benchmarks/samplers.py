"""Sampler comparison: FID and KID of one trained model for every sampler at several NFE budgets.

NFE is counted honestly (`minidiffusion.diffusion.samplers.nfe`): Heun's second evaluation
counts, so Heun gets (NFE + 1) // 2 steps. Every sampler starts from the same seed. The reals
floor (N real training images scored the same way) is reported alongside.

    python benchmarks/samplers.py RUN_DIR --n 2048 --nfe 5 10 20 50 100 [--ddpm-1000]
    python benchmarks/samplers.py --pretrained fmnist --n 2048
    python benchmarks/samplers.py --pretrained fmnist --samplers dpmpp_2m unipc --schedules karras exponential

`--schedules` names the sigma spacings to compare (`DiffusionModel.sigmas`: default = the model's own
grid, karras, exponential = uniform in log sigma, auto = `schedule_for_budget`); each is a row.

Prints a markdown table, writes JSON (`--json`) and a plot of FID against NFE (log x axis, `--plot`).
`--render A.json B.json` joins saved runs (same model, N and seed) into one table and plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiffusion.diffusion.samplers import SAMPLERS, nfe, steps_for_budget
from minidiffusion.metrics.evaluate import evaluate_samples, reals_floor, reference_features
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.pipelines.image import DiffusionModel


def steps_for(sampler: str, budget: int) -> int:
    """Return the number of steps whose honest NFE is at most `budget` (Heun: 2 per step, minus 1)."""
    return max(1, steps_for_budget(sampler, budget))


def run(model: DiffusionModel, samplers: list[str], budgets: list[int], n: int, seed: int, features,
        ddpm_1000: bool, precision: str = "fp32", on_row=None, schedules: tuple[str, ...] = ("default",)) -> dict:
    """Return {'floor': {...}, 'rows': [{sampler, schedule, steps, nfe, fid, kid, kid_std, seconds}, ...]}.

    `on_row(result so far)` is called after every case, so a long run that is cut keeps its rows."""
    reference = reference_features(features)
    floor = reals_floor(features, n, seed, reference)
    cases = [(s, sched, b) for s in samplers for sched in schedules for b in budgets]
    if ddpm_1000 and "ddpm" in samplers:
        cases.append(("ddpm", schedules[0], 1000))
    rows = []
    for sampler, schedule, budget in tqdm(cases, desc="samplers x NFE", disable=None):
        start = time.time()
        steps = steps_for(sampler, budget)
        x, _ = model.sample(n, sampler=sampler, steps=steps, seed=seed, precision=precision,
                            schedule=None if schedule == "default" else schedule)
        scores = evaluate_samples(x, features, with_reals=False, seed=seed, reference=reference)
        rows.append({"sampler": sampler, "schedule": schedule, "budget": budget, "steps": steps,
                     "nfe": nfe(sampler, steps), **scores, "seconds": round(time.time() - start, 1)})
        tqdm.write(f"{sampler:>16} {schedule:>11} steps={steps:<5} nfe={rows[-1]['nfe']:<5} fid={scores['fid']:.3f} "
                   f"kid={scores['kid']:.5f}")
        if on_row is not None:
            on_row({"floor": floor, "rows": rows})
    return {"floor": floor, "rows": rows}


def merge(results: list[dict]) -> dict:
    """Return one result from several saved runs of the same model at the same N and seed (rows joined)."""
    keys = {(r.get("model"), r["n"], r.get("seed")) for r in results}
    if len(keys) != 1:
        raise SystemExit(f"--render needs runs of one model at one N and seed, got {sorted(map(str, keys))}")
    return {**results[0], "rows": [row for r in results for row in r["rows"]]}


def _label(row: dict) -> str:
    """A row's name in the table and plot: the sampler, with its schedule unless the model's own."""
    schedule = row.get("schedule", "default")
    return row["sampler"] if schedule == "default" else f"{row['sampler']} ({schedule})"


def markdown(result: dict, n: int) -> str:
    """Return the results as a markdown table: a row per sampler, a column per NFE budget (FID / KID x 1e3).

    A cell whose honest NFE is below its column's budget (Heun: 2 per step, minus 1) names it."""
    rows = result["rows"]
    cols = sorted({r["budget"] for r in rows})
    lines = [f"| sampler | {' | '.join(f'NFE {v}' for v in cols)} |", "|---|" + "---:|" * len(cols)]
    for s in dict.fromkeys(_label(r) for r in rows):
        cells = []
        for v in cols:
            r = next((r for r in rows if _label(r) == s and r["budget"] == v), None)
            cell = f"{r['fid']:.2f} / {1e3 * r['kid']:.1f}" if r else ""
            cells.append(cell + (f" ({r['nfe']})" if r and r["nfe"] != v else ""))
        lines.append(f"| {s} | {' | '.join(cells)} |")
    f = result["floor"]
    lines.append(f"\nFID / KID x 1e3 at N = {n}; reals floor (N real training images): "
                 f"FID {f['fid']:.2f}, KID x 1e3 {1e3 * f['kid']:.1f}.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Write FID against NFE, one line per sampler, log-log axes, the reals floor dashed."""
    from minidiffusion.learner.plotting import new_figure, save_figure

    fig, axes = new_figure()
    ax = axes[0, 0]
    for s in dict.fromkeys(_label(r) for r in result["rows"]):
        pts = sorted((r["nfe"], r["fid"]) for r in result["rows"] if _label(r) == s)
        ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    ax.axhline(result["floor"]["fid"], color="gray", linestyle="--", label="reals floor")
    ax.set_xscale("log")
    ax.set_yscale("log")  # FIDs span two orders of magnitude between 5 and 50 NFE
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID (lower is better)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--nfe", nargs="*", type=int, default=[5, 10, 20, 50, 100],
                   help="NFE budgets (none with --ddpm-1000: only DDPM at 1000 steps)")
    p.add_argument("--ddpm-1000", action="store_true", help="also DDPM with 1000 steps")
    p.add_argument("--schedules", nargs="+", default=["default"],
                   help="sigma spacings, a row each: default (the model's), karras, exponential, cosine, auto")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", help="network precision while sampling (auto: bf16 where fast)")
    p.add_argument("--features", default=None, help="feature network (default: the shipped classifier)")
    p.add_argument("--json", default="benchmarks/results/samplers.json")
    p.add_argument("--plot", default="benchmarks/results/samplers.png")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="no sampling: print the table and write --plot from saved results (same model and N)")
    args = p.parse_args()
    if args.render:
        result = merge([json.loads(Path(f).read_text()) for f in args.render])
        print(markdown(result, result["n"]))
        plot(result, Path(args.plot))
        return
    if args.pretrained:
        model = DiffusionModel.from_pretrained(args.pretrained)
    elif args.run_dir:
        model = DiffusionModel.from_run(args.run_dir)
    else:
        p.error("give a run directory or --pretrained NAME")
    features = load_feature_network(args.features)
    start = time.time()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "n": args.n, "seed": args.seed, "precision": args.precision,
            "model": args.run_dir or args.pretrained}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        Path(args.json).write_text(json.dumps({**meta, "seconds": round(time.time() - start, 1), **result}, indent=2))

    result = run(model, args.samplers, args.nfe, args.n, args.seed, features, args.ddpm_1000, args.precision, save,
                 tuple(args.schedules))
    save(result)
    meta["seconds"] = round(time.time() - start, 1)
    print(markdown(result, args.n))
    plot(result, Path(args.plot))
    print(json.dumps({"json": args.json, "plot": args.plot, **meta}))


if __name__ == "__main__":
    main()

"""Classifier guidance on Fashion-MNIST: the shipped model's unconditional branch steered to each class by the
shipped classifier's gradient (the lesson's "magic function"), for several guidance scales.

    python benchmarks/gradient_guidance.py --scales 0 1 2 5 10 --n 500 --judge runs/fmnist-judge \
        --plot docs/classifier-guidance.png

For each scale: `--n` samples with balanced target labels, sampled with guidance 0 (the model's null
label: an unconditional model) and DPM-Solver++(2M) in 20 steps, each step's denoiser pushed by
scale * sigma^2 * grad log p(label | x0_hat); reported: the classifier's accuracy on the samples
(how often they are the class they were steered to; with --judge also by a classifier trained with
another seed, since the steering classifier's own verdict is flattered by its gradient), FID/KID
against the test set, seconds.
Prints a markdown table, writes JSON and (with --plot) a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from minidiffusion.metrics.evaluate import evaluate_samples, reference_features
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.pipelines.image import DiffusionModel
from minidiffusion.pipelines.steering import classifier_steer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 5.0, 10.0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/gradient_guidance.json")
    p.add_argument("--plot", default=None, help="PNG of accuracy and FID against the scale")
    p.add_argument("--judge", default=None, help="an independent classifier run (another seed) that also scores")
    args = p.parse_args()
    model = DiffusionModel.from_pretrained("fmnist")
    features = load_feature_network()
    classifier = load_feature_network().model  # the same v2 classifier, its logits
    reference = reference_features(features)
    judge = load_feature_network(args.judge).model if args.judge else None
    rows = []
    for scale in args.scales:
        start = time.time()
        steer = classifier_steer(classifier, scale) if scale else None
        x, ids = model.sample(args.n, guidance=0.0, steps=args.steps, seed=args.seed, steer=steer)
        with torch.no_grad():
            acc = float((classifier(x).argmax(1) == ids).float().mean())
            judged = float((judge(x).argmax(1) == ids).float().mean()) if judge is not None else None
        res = evaluate_samples(x, features, with_reals=False, seed=args.seed, reference=reference)
        rows.append({"scale": scale, "accuracy": acc, "judge_accuracy": judged, "fid": res["fid"], "kid": res["kid"],
                     "seconds": round(time.time() - start, 1)})
        print(f"scale {scale}: accuracy {acc:.3f}, FID {res['fid']:.3f}", flush=True)
    print("| classifier-guidance scale | accuracy (steering classifier) | accuracy (independent judge) | FID | KID |"
          " seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        judged = f"{r['judge_accuracy']:.1%}" if r["judge_accuracy"] is not None else "-"
        print(f"| {r['scale']:g} | {r['accuracy']:.1%} | {judged} | {r['fid']:.3f} | {r['kid']:.1e} | {r['seconds']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "n": args.n, "steps": args.steps, "date": time.strftime(
        "%Y-%m-%d"), "machine": platform.processor() or platform.machine(), "torch": torch.__version__}, indent=1))
    if args.plot:
        from minidiffusion.learner.plotting import new_figure, save_figure

        fig, ax = new_figure(1, 2, size=(4.5, 3.2))
        s = [r["scale"] for r in rows]
        ax[0, 0].plot(s, [r["accuracy"] for r in rows], "o-", label="steering classifier")
        if judge is not None:
            ax[0, 0].plot(s, [r["judge_accuracy"] for r in rows], "s--", label="independent judge")
            ax[0, 0].legend()
        ax[0, 0].set(xlabel="guidance scale", ylabel="accuracy", title="samples of the steered class")
        ax[0, 1].plot(s, [r["fid"] for r in rows], "o-", color="tab:red")
        ax[0, 1].set(xlabel="guidance scale", ylabel="FID", title=f"FID (n={args.n})")
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()

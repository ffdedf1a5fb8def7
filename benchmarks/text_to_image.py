"""Text-to-image prompt adherence and quality against guidance: CLIP score and KID/FID, the trade-off curve.

For `--prompts` emoji of each split (held-out "test" and "train", spread evenly over the split), the
pipeline draws one image per prompt (the emoji's caption, seed = the prompt's index) at each
guidance scale. Each cell reports the CLIP score (our CLIP, `metrics/clip_score.py`: 100 x mean
cosine of image and prompt) beside the same score of the real emoji for the same prompts, and KID
(x 1e3) / FID of the images against the 368 held-out emoji in the emoji classifier's feature space
beside the reals floor at the same N. Every image of a row starts from the same noise, so the rows
differ only by guidance.

    python benchmarks/text_to_image.py runs/emoji-t2i --clip runs/emoji-clip --prompts 64 \
        --guidance 1 2 4 7.5 12 --json benchmarks/results/text_to_image.json --plot docs/t2i-guidance.png

Prints a markdown table and writes JSON (and the KID-against-CLIP-score plot with --plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from minidiffusion.data.captions import caption, caption_parts
from minidiffusion.data.emoji import load_emoji
from minidiffusion.data.images import uint8_to_float
from minidiffusion.metrics.clip_score import clip_score
from minidiffusion.metrics.evaluate import default_feature_network, evaluate_samples, reference_features
from minidiffusion.pipelines.text import load_clip
from minidiffusion.pipelines.text_to_image import TextToImage


def prompts_of(split: str, k: int) -> tuple[list[str], torch.Tensor]:
    """Return (k captions spread evenly over the emoji of `split`, their real images [k, 3, 64, 64] in [-1, 1])."""
    s = load_emoji(split)
    idx = torch.linspace(0, len(s) - 1, min(k, len(s))).round().long().tolist()
    texts = [caption(caption_parts(s.names[i], s.groups[i], s.subgroups[i])) for i in idx]
    return texts, uint8_to_float(s.images[idx])


def draw(pipe: TextToImage, prompts: list[str], guidance: float, steps: int, precision: str) -> torch.Tensor:
    """Return one image per prompt, [len(prompts), 3, 64, 64] in [-1, 1]; prompt i uses seed i."""
    return torch.cat([pipe(p, n=1, guidance=guidance, steps=steps, seed=i, precision=precision)
                      for i, p in enumerate(prompts)])


def table(rows: list[dict], reals: dict) -> str:
    """Return the markdown table: a row per (split, guidance)."""
    out = ["| prompts | guidance | CLIP score | real emoji CLIP score | KID x 1e3 | FID | reals floor KID / FID |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = reals[r["split"]]
        out.append(f"| {r['split']} ({r['n']}) | {r['guidance']:g} | {r['clip_score']:.2f} | {f['clip_score']:.2f} | "
                   f"{1e3 * r['kid']:.1f} | {r['fid']:.2f} | {1e3 * r['kid_reals']:.1f} / {r['fid_reals']:.2f} |")
    return "\n".join(out)


def plot(rows: list[dict], reals: dict, path: str) -> None:
    """Draw KID against CLIP score, a line per split labelled by guidance, the reals' CLIP score dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for split, colour in (("test", "C0"), ("train", "C1")):
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        ax.plot([r["clip_score"] for r in rs], [1e3 * r["kid"] for r in rs], "o-", color=colour,
                label=f"{split} prompts")
        for r in rs:
            ax.annotate(f"{r['guidance']:g}", (r["clip_score"], 1e3 * r["kid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.axvline(reals[split]["clip_score"], color=colour, ls="--", lw=0.8)
    ax.set_xlabel("CLIP score (higher: closer to the prompt)")
    ax.set_ylabel("KID x 1e3 (lower: closer to real emoji)")
    ax.set_title("guidance scale trade-off (labels: scale; dashed: real emoji)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a text-to-image run or pipeline folder")
    p.add_argument("--pretrained", default=None, help="a shipped pipeline instead (emoji)")
    p.add_argument("--clip", required=True, help="the CLIP run that scores (train emoji-clip)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per split (one image each)")
    p.add_argument("--splits", nargs="+", default=["test", "train"], choices=["test", "train"])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5, 12.0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    if bool(args.run_dir) == bool(args.pretrained):
        p.error("give a run directory or --pretrained NAME")
    pipe = TextToImage.from_pretrained(args.pretrained) if args.pretrained else TextToImage.from_run(args.run_dir)
    clip, tok = load_clip(args.clip)
    net = default_feature_network("emoji")
    ref = reference_features(net, "emoji")
    start = time.time()
    rows, reals = [], {}
    for split in args.splits:
        prompts, real = prompts_of(split, args.prompts)
        reals[split] = {"clip_score": clip_score(clip, tok, real, prompts), "n": len(prompts)}
        for g in args.guidance:
            t = time.time()
            images = draw(pipe, prompts, g, args.steps, args.precision)
            score = evaluate_samples(images, net, reference=ref, data="emoji")
            rows.append({"split": split, "n": len(prompts), "guidance": g, "clip_score": clip_score(clip, tok, images,
                                                                                                   prompts),
                         **{k: score[k] for k in ("kid", "fid", "kid_reals", "fid_reals")},
                         "seconds": round(time.time() - t, 1)})
            print(f"{split} guidance {g:g}: CLIP score {rows[-1]['clip_score']:.2f}, KID {1e3 * score['kid']:.1f}e-3, "
                  f"{rows[-1]['seconds']} s", flush=True)
    print(table(rows, reals))
    result = {"model": args.run_dir or f"pretrained:{args.pretrained}", "clip": args.clip, "steps": args.steps,
              "sampler": pipe.cfg.sampler, "rows": rows, "reals": reals, "seconds": round(time.time() - start, 1),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, reals, args.plot)


if __name__ == "__main__":
    main()

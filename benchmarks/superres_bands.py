"""Where an x2 upscaler gains or loses against bicubic: its PSNR on held-out crops, grouped by how hard each crop is.

The held-out photo crops are very unequal: half are nearly flat (sky, smooth gradients of the wallpapers), where
bicubic upscaling is already 45-55 dB and any error the network adds costs many dB; the other half carry the
detail super-resolution is for (bicubic 25-40 dB). The mean of per-crop PSNRs (`eval`'s `psnr`) is dominated by
the flat half; the pooled PSNR (of the mean squared error over all crops, `psnr_pooled`) by the detailed half.
This prints both for each upscaler, and the mean gain over bicubic in bands of bicubic's own PSNR. Upscalers:
run directories, shipped names (`photos-sr2`), or `linear-base` (the least-squares linear filter bank the
shipped recipe starts from, fitted here: no network). Prints a markdown table, writes JSON.

    python benchmarks/superres_bands.py linear-base photos-sr2 --n 512
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from minidiffusion.metrics.image_quality import psnr
from minidiffusion.nn.superres import SuperResNet, downscale
from minidiffusion.pipelines.superres import Upscaler, heldout_images, pooled_psnr

BANDS = ((0, 30), (30, 40), (40, 45), (45, 50), (50, float("inf")))  # bicubic's PSNR of a crop, dB


def linear_base(preset: str = "photos-sr2") -> Upscaler:
    """Return `preset`'s network before its first step: the least-squares linear base alone (`fit_base`, on its
    training crops), the residual network still zero."""
    from minidiffusion.recipes import load_config
    from minidiffusion.recipes.superres import fit_base, superres_data

    _, cfg = load_config(preset, ['model.base="linear"'])
    net = SuperResNet(cfg.model)
    fit_base(net, cfg, superres_data(cfg)[0])
    return Upscaler(net.eval(), cfg.model)


def load(name: str) -> Upscaler:
    """Return the upscaler a run directory or a shipped name points to ("linear-base": `linear_base()`)."""
    if name == "linear-base":
        return linear_base()
    return Upscaler.from_run(name) if Path(name).is_dir() else Upscaler.from_pretrained(name)


def per_crop(model: Upscaler, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (network PSNR, bicubic PSNR) per crop, float64 (N,) each, for originals [N, C, S, S] in [-1, 1]."""
    net, bic = [], []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size]
        low = downscale(x, model.scale)
        net.append(psnr(model.upscale_batch(low), x))
        bic.append(psnr(model.bicubic(low), x))
    return torch.cat(net), torch.cat(bic)


def row(name: str, net: torch.Tensor, bic: torch.Tensor) -> dict:
    """Return one upscaler's summary: mean and pooled PSNR of it and of bicubic, and per band (n, mean gain)."""
    bands = []
    for lo, hi in BANDS:
        k = (bic >= lo) & (bic < hi)
        gain = float((net[k] - bic[k]).mean()) if k.any() else None
        bands.append({"lo": lo, "hi": hi, "n": int(k.sum()), "gain": gain})
    return {"upscaler": name, "n": len(net), "psnr": float(net.mean()), "psnr_bicubic": float(bic.mean()),
            "psnr_pooled": pooled_psnr(net), "psnr_pooled_bicubic": pooled_psnr(bic), "bands": bands}


def _band(b: dict) -> str:
    return f"{b['lo']}-{b['hi']:g} dB" if b["hi"] != float("inf") else f">= {b['lo']} dB"


def markdown(rows: list[dict]) -> str:
    """Return the table: one line per upscaler."""
    bands = rows[0]["bands"]
    head = ["upscaler", "mean PSNR (bicubic)", "pooled PSNR (bicubic)"]
    head += [f"gain, bicubic {_band(b)} ({b['n']} crops)" for b in bands]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['upscaler']}`", f"{r['psnr']:.2f} ({r['psnr_bicubic']:.2f})",
                 f"{r['psnr_pooled']:.2f} ({r['psnr_pooled_bicubic']:.2f})"]
        cells += ["" if b["gain"] is None else f"{b['gain']:+.2f}" for b in r["bands"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("upscalers", nargs="+", help="run directories or shipped names")
    ap.add_argument("--data", default="photos", help="held-out images: photos, sprites or emoji")
    ap.add_argument("--n", type=int, default=512, help="held-out crops")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/superres_bands.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = heldout_images(args.data, args.n)
    rows = []
    with torch.no_grad():
        for name in args.upscalers:
            rows.append(row(name, *per_crop(load(name), images)))
    print(markdown(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "data": args.data,
                               "n": args.n, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

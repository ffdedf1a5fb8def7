"""Reconstruction quality of trained autoencoders on held-out emoji and photo crops: PSNR, SSIM, rFID/KID.

    python benchmarks/autoencoders.py runs/emoji-vae runs/emoji-vae-f8 --n 368

For each autoencoder (a run directory, a shipped name, or a diffusers AutoencoderKL folder) it
reconstructs the 368 held-out emoji and `--photos` crops of the held-out photographs through the
posterior mean and scores them (metrics/image_quality.py; rFID/KID in the emoji classifier's
feature space, emoji only). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from minidiffusion.pipelines.autoencoder import evaluate_autoencoder, load_autoencoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("autoencoders", nargs="+")
    p.add_argument("--n", type=int, default=368, help="held-out emoji to reconstruct (at most 368)")
    p.add_argument("--photos", type=int, default=256, help="held-out photo crops to reconstruct (0: none)")
    p.add_argument("--json", default="benchmarks/results/autoencoders.json")
    args = p.parse_args()
    rows = []
    for path in args.autoencoders:
        ae = load_autoencoder(path)
        row = {"autoencoder": path, "f": ae.downsample_factor, "latent": f"{64 // ae.downsample_factor}x"
               f"{64 // ae.downsample_factor}x{ae.cfg.latent_channels if hasattr(ae, 'cfg') else ae.latent_channels}",
               "params": sum(q.numel() for q in ae.parameters()), "scale_factor": round(float(ae.scale_factor), 4)}
        row["emoji"] = evaluate_autoencoder(path, "emoji", n=args.n)
        if args.photos:
            row["photos"] = evaluate_autoencoder(path, "photos", n=args.photos)
        rows.append(row)
    print("| autoencoder | f | latent | params | emoji PSNR | emoji SSIM | emoji rFID | emoji rKID | photos PSNR "
          "| photos SSIM |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e, ph = r["emoji"], r.get("photos", {})
        rfid = f"{e['rfid']:.3f}" if "rfid" in e else "-"
        rkid = f"{e['rkid']:.2e}" if "rkid" in e else "-"
        print(f"| {r['autoencoder']} | {r['f']} | {r['latent']} | {r['params']:,} | {e['psnr']:.2f} dB | "
              f"{e['ssim']:.4f} | {rfid} | {rkid} | {ph.get('psnr', float('nan')):.2f} dB | "
              f"{ph.get('ssim', float('nan')):.4f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                           "machine": platform.processor() or platform.machine()}, indent=1))


if __name__ == "__main__":
    main()

"""Griffin-Lim round trip before any training: spectral convergence and speed, ours (torch) against librosa.

Input: one note per instrument family (its first program, mid-range pitch, velocity 100), 2.032 s
at 16 kHz, with `SpectrogramConfig()` (n_fft 1024, hop 256). Two measurements per iteration count:

- *phase only*: Griffin-Lim from the clip's true linear magnitude S, ours (`griffin_lim`) against
  `librosa.griffinlim` on the same S, plain (momentum 0) and fast (momentum 0.99), from random phases
  (each library its own generator) and from zero phase (the same start: the two should agree);
- *image*: the whole inverse from the 128 x 128 image (dB-clamped mel power -> non-negative least
  squares -> fast Griffin-Lim, `image_to_wave`) against librosa's `mel_to_audio` on the same mel power.

Spectral convergence is ||S - |STFT(x_hat)||| / ||S|| against the clip's true S (0 = perfect), the mean
over the ten clips. Time is seconds of compute per second of audio (ours batched over the ten clips,
librosa one clip at a time, as it runs), with `--threads` torch threads. Prints a markdown table, writes JSON.

    python benchmarks/griffin_lim.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from minidiffusion.data import spectrogram as sp
from minidiffusion.data.instruments import FAMILIES, SECONDS, Synthesizer, render_note


def clips(seconds: float = SECONDS) -> np.ndarray:
    """One note per family: float32 [10, T] in [-1, 1]."""
    with Synthesizer() as synth:
        out = []
        for family in FAMILIES:
            prog = family.programs[0]
            out.append(render_note(prog.number, (prog.low + prog.high) // 2, 100, seconds, synth=synth))
    return np.stack(out)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _sc(mag: torch.Tensor, waves, cfg: sp.SpectrogramConfig) -> float:
    return float(sp.spectral_convergence(mag, torch.as_tensor(np.asarray(waves)), cfg).mean())


def run(waves: np.ndarray, iters=(8, 32, 100), cfg: sp.SpectrogramConfig | None = None) -> list[dict]:
    """Return one row per (measurement, method, init, n_iter): spectral convergence and seconds per audio second."""
    import librosa

    cfg = cfg or sp.SpectrogramConfig()
    x = torch.from_numpy(waves)
    mag = sp.magnitude(x, cfg)
    audio_s = waves.size / cfg.sample_rate
    kw = {"n_fft": cfg.n_fft, "hop_length": cfg.hop}
    rows = []
    for n_iter in iters:
        for momentum in (0.0, 0.99):
            for init in ("random", "zeros"):
                ours, t_ours = _timed(lambda: sp.griffin_lim(mag, cfg, n_iter, momentum, init=init))  # noqa: B023
                ref, t_ref = _timed(lambda: [librosa.griffinlim(  # noqa: B023
                    s, n_iter=n_iter, momentum=momentum, init="random" if init == "random" else None,  # noqa: B023
                    random_state=0, **kw) for s in mag.numpy()])
                rows.append({"input": "magnitude", "method": "fast" if momentum else "plain", "init": init,
                             "n_iter": n_iter, "sc_ours": round(_sc(mag, ours, cfg), 4),
                             "sc_librosa": round(_sc(mag, np.stack(ref), cfg), 4),
                             "s_per_audio_s_ours": round(t_ours / audio_s, 4),
                             "s_per_audio_s_librosa": round(t_ref / audio_s, 4)})
        image = sp.wave_to_image(x, cfg)
        mel = sp.image_to_power(image.squeeze(1), cfg).numpy()
        ours, t_ours = _timed(lambda: sp.image_to_wave(image, cfg, n_iter))  # noqa: B023
        np.random.seed(0)  # mel_to_audio passes its keywords to filters.mel too, so no random_state
        ref, t_ref = _timed(lambda: [librosa.feature.inverse.mel_to_audio(  # noqa: B023
            m, sr=cfg.sample_rate, n_iter=n_iter, fmin=cfg.fmin, fmax=cfg.fmax, **kw) for m in mel])  # noqa: B023
        rows.append({"input": "image", "method": "fast", "init": "random", "n_iter": n_iter,
                     "sc_ours": round(_sc(mag, ours, cfg), 4), "sc_librosa": round(_sc(mag, np.stack(ref), cfg), 4),
                     "s_per_audio_s_ours": round(t_ours / audio_s, 4),
                     "s_per_audio_s_librosa": round(t_ref / audio_s, 4)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| input | method | init | n_iter | SC ours | SC librosa | s/audio-s ours | s/audio-s librosa |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['input']} | {r['method']} | {r['init']} | {r['n_iter']} | {r['sc_ours']:.4f} | "
                     f"{r['sc_librosa']:.4f} | {r['s_per_audio_s_ours']:.4f} | {r['s_per_audio_s_librosa']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, nargs="+", default=[8, 32, 100])
    p.add_argument("--threads", type=int, default=1, help="torch threads (librosa's numpy FFT uses one)")
    p.add_argument("--json", default="benchmarks/results/griffin_lim.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    waves = clips()
    rows = run(waves, args.iters)
    print(markdown(rows))
    import librosa

    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "librosa": librosa.__version__, "clips": len(waves),
           "seconds_per_clip": waves.shape[1] / sp.SpectrogramConfig().sample_rate,
           "config": vars(sp.SpectrogramConfig()), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

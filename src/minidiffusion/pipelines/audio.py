"""Sound from a spectrogram model: generated images -> waves (Griffin-Lim) -> WAV files, a grid and a page to listen.

A diffusion model trained on a sound set (`data = "instruments"`, data/sets.py's AUDIO_SETS) makes mel
spectrogram images, 1 x 128 x 128 in [-1, 1] (data/spectrogram.py). `write_audio_samples` turns each back
into a wave with `spectrogram.image_to_wave` (mel -> linear magnitude -> fast Griffin-Lim, on one torch
thread: its many small FFTs run fastest there, and far slower when a busy machine's threads compete) and
writes, for `out` = NAME.wav (or NAME.png, or NAME):

    NAME-0.wav, NAME-1.wav, ...   one 16-bit mono WAV per sample (exactly `out` when it is one sample and a .wav)
    NAME.png                      the spectrograms as a grid (one labelled row per class when they are balanced)
    NAME.html                     a page with one <audio controls> player per sample, its class as the caption and
                                  its spectrogram inline: self-contained, it plays offline from the folder

`sample_audio_to_files` samples a `DiffusionModel` and writes those files, checking the settings and the
paths before any sampling. Inference only: nothing here imports the Learner or the recipes.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import torch

from ..data.audio import write_wav
from ..data.images import check_range, to_pil
from ..data.sets import AUDIO_SETS
from ..data.spectrogram import SpectrogramConfig, image_to_wave
from ..errors import ConfigError
from ..paths import atomic_write, check_writable
from .image import check_sampling
from .outputs import save_samples

__all__ = ["one_thread", "writes_audio", "audio_paths", "write_audio_samples", "sample_audio_to_files"]

_SUFFIXES = ("", ".wav", ".png", ".html")  # what `out` may end in: every file is named from NAME


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread (Griffin-Lim's small FFTs); the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def writes_audio(model, out: str | Path) -> bool:
    """True if sampling `model` into `out` should write sound: the model learned a sound set's spectrograms
    (its config's `data` is in AUDIO_SETS) or `out` names a .wav file."""
    return getattr(model.cfg, "data", "") in AUDIO_SETS or Path(out).suffix.lower() == ".wav"


def audio_paths(out: str | Path, n: int) -> dict:
    """Return the files `write_audio_samples` writes for `n` samples and `out`: {'wavs': [n Paths], 'grid', 'html'}.

    `out` is NAME.wav, NAME.png, NAME.html or NAME: the WAVs are NAME-0.wav ... (just `out` when n == 1 and
    it is a .wav), the grid NAME.png and the page NAME.html.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ConfigError(f"sound samples are written as NAME-0.wav ..., NAME.png and NAME.html; give --out a name "
                          f"ending in .wav (or .png), got {out}")
    base = out.with_suffix("") if suffix else out
    wavs = [out] if n == 1 and suffix == ".wav" else [base.with_name(f"{base.name}-{i}.wav") for i in range(n)]
    return {"wavs": wavs, "grid": base.with_name(base.name + ".png"), "html": base.with_name(base.name + ".html")}


def _check_shape(shape: Sequence[int], cfg: SpectrogramConfig) -> None:
    """Refuse images of `shape` [N, C, H, W] that are not spectrograms [N, 1, n_mels, frames]."""
    want = (1, cfg.n_mels, cfg.frames)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise ConfigError(f"sound is made from spectrogram images [N, {', '.join(map(str, want))}], got "
                          f"{list(shape)}; only a model trained on data=instruments makes them, so give --out a .png "
                          "for this one")


def _check_spectrograms(images: torch.Tensor, cfg: SpectrogramConfig) -> None:
    if not isinstance(images, torch.Tensor):
        raise ConfigError(f"expected spectrogram images as a tensor [N, 1, {cfg.n_mels}, {cfg.frames}], got "
                          f"{type(images).__name__}")
    _check_shape(images.shape, cfg)
    if not len(images):
        raise ConfigError("no spectrograms to turn into sound: give at least one image")
    check_range(images, "spectrograms to sound", allow_unusual=True)


def _captions(labels, class_names: Sequence[str] | None, n: int) -> list[str]:
    if labels is None:
        return [f"sample {i}" for i in range(n)]
    if isinstance(labels, torch.Tensor):
        names = list(class_names or [])
        return [names[k] if 0 <= k < len(names) else f"class {k}" for k in labels.tolist()]
    captions = [str(c) for c in labels]
    if len(captions) != n:
        raise ConfigError(f"{len(captions)} captions for {n} samples; give one label per sample")
    return captions


def _png_data_uri(image: torch.Tensor) -> str:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _page(title: str, wavs: list[Path], captions: list[str], images: torch.Tensor, grid: Path, folder: Path,
          cfg: SpectrogramConfig) -> str:
    """The HTML page: one figure per sample (caption, inline spectrogram, player), the grid linked below."""
    def rel(p: Path) -> str:
        return quote(Path(os.path.relpath(p, folder)).as_posix())

    figures = "\n".join(
        f'<figure><figcaption>{html.escape(c)} <small>({html.escape(w.name)})</small></figcaption>\n'
        f'<img src="{_png_data_uri(img)}" width="{2 * cfg.frames}" height="{2 * cfg.n_mels}" '
        f'alt="mel spectrogram of {html.escape(c)}">\n'
        f'<audio controls preload="metadata" src="{rel(w)}"></audio></figure>'
        for w, c, img in zip(wavs, captions, images, strict=True))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}
img{{display:block;image-rendering:pixelated;border:1px solid #ccc}} audio{{width:{2 * cfg.frames}px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(wavs)} generated clips of {cfg.seconds:g} s at {cfg.sample_rate} Hz; each image is its mel spectrogram
({cfg.n_mels} bands, low pitches at the bottom, time left to right), turned into sound by Griffin-Lim.</p>
{figures}
<p><a href="{rel(grid)}">All spectrograms as one image</a></p>
</body></html>
"""


def write_audio_samples(images: torch.Tensor, labels, out: str | Path, class_names: Sequence[str] | None = None,
                        cfg: SpectrogramConfig | None = None, *, n_iter: int = 32, seed: int = 0) -> dict:
    """Write spectrogram images [N, 1, n_mels, frames] in [-1, 1] as sound: WAVs, grid PNG, HTML page (see
    the module docstring); return {'wavs': [paths], 'grid', 'html', 'sample_rate', 'griffin_lim_seconds'}.

    `labels` are class ids [N] (named by `class_names`), one caption per sample, or None. Each wave is
    `image_to_wave(image, cfg, n_iter, seed=seed)` (the level the image encodes, peak at most 1). All
    paths are checked before any work; each file is written atomically.
    """
    cfg = cfg or SpectrogramConfig()
    _check_spectrograms(images, cfg)
    paths = audio_paths(out, len(images))
    for p in (*paths["wavs"], paths["grid"], paths["html"]):
        check_writable(p)
    captions = _captions(labels, class_names, len(images))
    images = images.detach().float().cpu()
    start = time.time()
    with one_thread():
        waves = image_to_wave(images, cfg, n_iter=n_iter, seed=seed).squeeze(1)
    gl_seconds = time.time() - start
    for path, wave in zip(paths["wavs"], waves, strict=True):
        write_wav(path, wave, cfg.sample_rate)
    k = len(class_names or [])
    ids = labels if isinstance(labels, torch.Tensor) else None
    balanced = ids is not None and k > 0 and bool((torch.bincount(ids, minlength=k) == len(ids) // k).all())
    save_samples(images, ids, list(class_names or []), k, paths["grid"], balanced=balanced)
    page = _page(paths["html"].stem, paths["wavs"], captions, images, paths["grid"], paths["html"].parent, cfg)
    with atomic_write(paths["html"]) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"wavs": [str(p) for p in paths["wavs"]], "grid": str(paths["grid"]), "html": str(paths["html"]),
            "sample_rate": cfg.sample_rate, "griffin_lim_seconds": round(gl_seconds, 2)}


def sample_audio_to_files(model, out: str | Path, n: int = 4, labels=None, seed: int = 0, sampler: str | None = None,
                          steps: int | None = None, guidance: float | None = None, precision: str = "fp32",
                          n_iter: int = 32, schedule: str | None = None) -> dict:
    """Sample `n` spectrograms from a DiffusionModel and write them as sound next to `out` (`write_audio_samples`).

    Settings, the model's image shape and the output paths are checked before any sampling starts; `schedule`
    picks the sigmas (`DiffusionModel.sigmas`; None: the model's own). Returns {wavs, grid, html, sample_rate, n,
    labels (the class names, or None), sampler, steps, guidance, nfe, precision, seed, seconds (sampling),
    griffin_lim_seconds} (and schedule when one was given).
    """
    cfg = SpectrogramConfig()
    sampler, steps, guidance = model.settings(sampler, steps, guidance)
    check_sampling(n=n, seed=seed)
    if model.vae is None:  # a latent model's images have the VAE's shape: checked once decoded
        _check_shape((n, model.cfg.model.in_channels, model.cfg.image_size, model.cfg.image_size), cfg)
    paths = audio_paths(out, n)
    for p in (*paths["wavs"], paths["grid"], paths["html"]):
        check_writable(p)
    start = time.time()
    x, ids = model.sample(n, labels=labels, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                          precision=precision, schedule=schedule)
    seconds = time.time() - start
    result = write_audio_samples(x, ids, out, model.class_names, cfg, n_iter=n_iter, seed=seed)
    names = _captions(ids, model.class_names, n) if ids is not None else None
    return {**result, "n": n, "labels": names, "sampler": sampler, "steps": steps, "guidance": guidance,
            "nfe": model.nfe(sampler, steps), "precision": precision, "seed": seed, "seconds": round(seconds, 2),
            **({"schedule": schedule} if schedule else {})}

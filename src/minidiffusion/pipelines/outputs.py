"""What sampling writes: a PNG grid (one labelled row per class when it can), the denoising
progression, and a `.npz` of the images in [-1, 1] with their labels. The command line and the
web page call the same functions, so a grid looks the same wherever it was made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.images import save_grid, save_labelled_grid
from ..errors import ConfigError
from ..paths import atomic_write, check_writable

__all__ = ["save_samples", "save_npz", "sample_to_files", "output_paths"]


def output_paths(out: str | Path) -> dict[str, Path]:
    """Return the files a sampling run with grid `out` (a .png) writes: grid, progression, npz."""
    out = Path(out)
    return {"grid": out, "progression": out.with_name(out.stem + "-progression.png"), "npz": out.with_suffix(".npz")}


def save_npz(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None) -> Path:
    """Write images (float32 [N, C, H, W] in [-1, 1]) and labels ([N], or empty) as a compressed .npz, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no ".npz" to tmp's name
        np.savez_compressed(f, images=images.numpy(), labels=(labels.numpy() if labels is not None else np.array([])))
    return path


def save_samples(images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str], n_classes: int,
                 out: str | Path, balanced: bool) -> Path:
    """Write the PNG grid of `images` ([N, C, H, W] in [-1, 1]) to `out`; return its path.

    With `balanced` labels covering every class equally (the default labels of a conditional model),
    the grid has one labelled row per class; otherwise a plain square grid.
    """
    k = n_classes
    if labels is not None and balanced and k and len(images) % k == 0 and len(class_names) == k:
        order = torch.sort(labels, stable=True).indices  # one labelled row per class
        return save_labelled_grid(images[order], class_names, out)
    return save_grid(images, out, scale=2)


def sample_to_files(model, out: str | Path, n: int = 40, labels=None, seed: int = 0, sampler: str | None = None,
                    steps: int | None = None, guidance: float | None = None, precision: str = "fp32") -> dict:
    """Sample `n` images from a DiffusionModel and write grid, progression and .npz next to `out`.

    Settings are checked and the output path tested for writability before any sampling starts.
    Returns {grid, progression, npz, n, sampler, steps, guidance, nfe, precision, seed, seconds}.
    """
    import time

    sampler, steps, guidance = model.settings(sampler, steps, guidance)
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"the grid is a PNG: give --out a name ending in .png, got {out}")
    paths = output_paths(out)
    for p in paths.values():
        check_writable(p)
    kw = dict(sampler=sampler, steps=steps, guidance=guidance, precision=precision)
    start = time.time()
    x, ids = model.sample(n, labels=labels, seed=seed, **kw)
    seconds = time.time() - start
    save_samples(x, ids, model.class_names, model.cfg.model.n_classes, paths["grid"], balanced=not labels)
    model.progression(paths["progression"], n=min(4, n), seed=seed, labels=labels, **kw)
    save_npz(paths["npz"], x, ids)
    return {"grid": str(paths["grid"]), "progression": str(paths["progression"]), "npz": str(paths["npz"]),
            "n": n, "sampler": sampler, "steps": steps, "guidance": guidance, "nfe": model.nfe(sampler, steps),
            "precision": precision, "seed": seed, "seconds": round(seconds, 2)}

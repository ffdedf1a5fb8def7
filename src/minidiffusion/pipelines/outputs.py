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

__all__ = ["save_samples", "save_npz", "sample_to_files", "prompt_to_files", "output_paths", "load_image"]


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
                    steps: int | None = None, guidance: float | None = None, precision: str = "fp32",
                    schedule: str | None = None) -> dict:
    """Sample `n` images from a DiffusionModel and write grid, progression and .npz next to `out`.

    Settings are checked and the output path tested for writability before any sampling starts.
    `schedule` picks the sigmas (`DiffusionModel.sigmas`; None: the model's own).
    Returns {grid, progression, npz, n, sampler, steps, guidance, nfe, precision, seed, seconds}
    (and schedule when one was given).
    """
    import time

    sampler, steps, guidance = model.settings(sampler, steps, guidance)
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"the grid is a PNG: give --out a name ending in .png, got {out}")
    paths = output_paths(out)
    for p in paths.values():
        check_writable(p)
    kw = dict(sampler=sampler, steps=steps, guidance=guidance, precision=precision, schedule=schedule)
    model.sigmas(steps, sampler, schedule)  # a schedule the model cannot take fails before any sampling
    start = time.time()
    x, ids = model.sample(n, labels=labels, seed=seed, **kw)
    seconds = time.time() - start
    save_samples(x, ids, model.class_names, model.cfg.model.n_classes, paths["grid"], balanced=not labels)
    model.progression(paths["progression"], n=min(4, n), seed=seed, labels=labels, **kw)
    save_npz(paths["npz"], x, ids)
    return {"grid": str(paths["grid"]), "progression": str(paths["progression"]), "npz": str(paths["npz"]),
            "n": n, "sampler": sampler, "steps": steps, "guidance": guidance, "nfe": model.nfe(sampler, steps),
            "precision": precision, "seed": seed, "seconds": round(seconds, 2),
            **({"schedule": schedule} if schedule else {})}


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Return an image file as float32 [1, 3, size, size] in [-1, 1] (centre square, resized), for image-to-image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..data.images import uint8_to_float
    from ..errors import DataError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGBA")
            canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, img).convert("RGB")  # transparency on white, as the emoji are
            img = ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    except FileNotFoundError:
        raise DataError(f"init image {path} does not exist; give the path of a PNG or JPEG file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"init image {path} cannot be read as an image ({e}); give a PNG or JPEG file") from None
    arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    return uint8_to_float(arr)[None]


def prompt_to_files(pipe, out: str | Path, prompt: str, n: int = 4, negative_prompt: str | None = None,
                    seed: int = 0, sampler: str | None = None, steps: int | None = None,
                    guidance: float | None = None, init_image: str | Path | None = None, strength: float = 0.6,
                    precision: str = "auto") -> dict:
    """Run a TextToImage pipeline for `prompt` and write grid, progression and .npz next to `out`.

    Returns every setting (so any image can be made again: image k used seed + k) plus the paths and seconds.
    """
    import time

    from .text_to_image import strength_start

    sampler, steps, guidance = pipe.model.settings(sampler, steps, guidance)
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"the grid is a PNG: give --out a name ending in .png, got {out}")
    paths = output_paths(out)
    for p in paths.values():
        check_writable(p)
    size = pipe.cfg.image_size * pipe.model.vae.downsample_factor
    init = load_image(init_image, size) if init_image is not None else None
    if init is not None:
        strength_start(steps, strength)  # checks the range before any work
    kw = dict(negative_prompt=negative_prompt, guidance=guidance, steps=steps, sampler=sampler, init_image=init,
              strength=strength, precision=precision)
    start = time.time()
    x = pipe(prompt, n=n, seed=seed, **kw)
    seconds = time.time() - start
    save_grid(x, paths["grid"], scale=2)
    pipe.progression(paths["progression"], prompt, seed=seed, **kw)
    save_npz(paths["npz"], x, None)
    return {"grid": str(paths["grid"]), "progression": str(paths["progression"]), "npz": str(paths["npz"]),
            "prompt": prompt, "negative_prompt": negative_prompt, "n": n, "seed": seed, "sampler": sampler,
            "steps": steps, "guidance": guidance, "init_image": None if init_image is None else str(init_image),
            "strength": strength if init_image is not None else None, "precision": precision,
            "seconds": round(seconds, 2)}

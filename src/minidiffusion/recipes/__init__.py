"""Training recipes: each is a config dataclass plus a function that builds a Learner and trains it.

`minidiffusion train PRESET --out DIR [key=value ...]` runs any of them: a preset (a TOML file in
presets/, or a path) names its recipe with `recipe = "..."`, and the rest of it is that recipe's
config. Every recipe takes `epochs=`, `minutes=` (a wall-clock budget), `seed=` and `--resume` the
same way. Recipes are imported only by the command line, benchmarks and tests: inference
(pipelines/) and metrics never need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import apply_overrides, from_dict, load_preset
from ..errors import ConfigError
from .autoencoder import MLPAutoencoderTrainConfig, VAETrainConfig, train_mlp_autoencoder, train_vae
from .classifier import ClassifierConfig, train_classifier
from .clip import CLIPTrainConfig, train_clip
from .common import check_trained_together, distributed_fits, world_size
from .diffusion import DiffusionConfig, train_diffusion
from .distill import DistillConfig, train_distill
from .superres import SuperResDiffusionTrainConfig, SuperResTrainConfig, train_superres
from .text_to_image import TextToImageConfig, train_text_to_image

__all__ = ["Recipe", "RECIPES", "recipe_of", "load_config", "train"]


@dataclass(frozen=True)
class Recipe:
    """A trainable thing: its config class, its training function, and one line saying what it makes."""

    config: type
    train: Callable[..., dict]
    what: str


RECIPES: dict[str, Recipe] = {
    "classifier": Recipe(ClassifierConfig, train_classifier, "a ResNet image classifier (Fashion-MNIST)"),
    "diffusion": Recipe(DiffusionConfig, train_diffusion, "a diffusion model (U-Net, DDPM/cosine/EDM objective)"),
    "mlp_autoencoder": Recipe(MLPAutoencoderTrainConfig, train_mlp_autoencoder,
                              "the course's MLP autoencoder or VAE (Fashion-MNIST)"),
    "vae": Recipe(VAETrainConfig, train_vae, "a convolutional KL autoencoder for latent diffusion"),
    "clip": Recipe(CLIPTrainConfig, train_clip, "a CLIP (image and text towers, contrastive) on captioned emoji"),
    "distill": Recipe(DistillConfig, train_distill, "a consistency model distilled from an EDM model (1-4 steps)"),
    "superres": Recipe(SuperResTrainConfig, train_superres,
                       "a super-resolution network (x2: autoencoder, U-Net, perceptual loss, pretrained encoder)"),
    "superres_diffusion": Recipe(SuperResDiffusionTrainConfig, train_superres,
                                 "super-resolution as conditional diffusion (x2: a U-Net denoises the residual)"),
    "text_to_image": Recipe(TextToImageConfig, train_text_to_image,
                            "a text-to-image latent diffusion model (U-Net with cross-attention, frozen text encoder)"),
}

# keys only a classifier config has: how a preset or run config written before `recipe` existed is told apart
_CLASSIFIER_ONLY = {"label_smoothing", "tta", "stem_init", "optimizer", "pad", "flip", "erase", "anneal",
                    "pct_start", "adam_beta2", "decay_norm_bias", "alternate_flip"}


def recipe_of(d: dict, source: str = "the preset") -> str:
    """Return the recipe name a preset/config dict asks for (`recipe = "..."`; older files are recognised)."""
    name = d.get("recipe")
    if name is None:
        return "classifier" if _CLASSIFIER_ONLY & set(d) else "diffusion"
    if name not in RECIPES:
        raise ConfigError(f"{source} names recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return name


def load_config(preset: str, overrides: list[str] = (), recipe: str | None = None):
    """Return (recipe name, config) for a preset name or .toml path with `key=value` overrides applied.

    `recipe` forces the recipe (the `train-classifier` alias); a preset naming another one is refused.
    """
    d = load_preset(preset)
    name = recipe_of(d, f"preset {preset!r}")
    if recipe is not None and "recipe" in d and name != recipe:
        raise ConfigError(f"preset {preset!r} trains a {name} model, not a {recipe}; use `minidiffusion train "
                          f"{preset}` instead")
    name = recipe or name
    cfg = from_dict(RECIPES[name].config, d)
    return name, apply_overrides(cfg, list(overrides))


def train(preset: str | None, out: str | Path, overrides: list[str] = (), resume: bool = False,
          replace: bool = False, progress: bool = True, recipe: str | None = None) -> dict:
    """Train the preset's recipe into run directory `out`; return the recipe's summary (plus `recipe`).

    With `resume` and no preset, the run's own config.toml is the preset (a bare `--resume`). Under torchrun every
    process calls this and trains its share (`batch_size` is the global batch; see docs/distributed.md); the
    summary's `world_size` is the number of processes, and the other processes return a summary without results.
    """
    saved = Path(out) / "config.toml"
    if preset is None:
        if not (resume and saved.is_file()):
            raise ConfigError("give a preset to train (e.g. `minidiffusion train fmnist --out DIR`), or "
                              f"--resume a run directory that holds a config.toml ({out} does not)")
        preset = str(saved)
    name, cfg = load_config(preset, overrides, recipe)
    fits = distributed_fits()
    result = RECIPES[name].train(cfg, out, resume=resume, progress=progress, replace=replace)
    check_trained_together(name, fits)
    return {"recipe": name, **result, "world_size": world_size()}

"""minidiffusion: from deep learning foundations to Stable Diffusion, readable, fast and tested.

Images everywhere in this package are float32 NCHW tensors in [-1, 1] (see data/images.py).
The names below are the public API; each is imported from the module named in `_API` the first
time it is used, so `import minidiffusion` is cheap and importing an inference name (say
`DiffusionModel`) never loads the training code. The layout is described in docs/design.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    # data
    "FASHION_MNIST_CLASSES": ("data.fashion_mnist", "CLASSES"),
    "download_fashion_mnist": "data.fashion_mnist", "fashion_mnist_loaders": "data.fashion_mnist",
    "find_fashion_mnist": "data.fashion_mnist", "load_fashion_mnist": "data.fashion_mnist",
    "image_folder_loaders": "data.folders", "load_image_folder": "data.folders",
    "check_range": "data.images", "float_to_uint8": "data.images", "save_grid": "data.images",
    "uint8_to_float": "data.images", "DataLoaders": "data.loaders", "TensorLoader": "data.loaders",
    "BatchAugment": "data.augment", "random_crop": "data.augment", "random_erase": "data.augment",
    "random_flip": "data.augment",
    # networks
    "ResNet": "nn.resnet", "ResNetConfig": "nn.resnet", "UNet": "nn.unet", "UNetConfig": "nn.unet",
    # diffusion maths
    "OBJECTIVES": "diffusion.objectives", "CosineObjective": "diffusion.objectives",
    "DDPMObjective": "diffusion.objectives", "EDMObjective": "diffusion.objectives",
    "ObjectiveConfig": "diffusion.config", "build_objective": "diffusion.config",
    "SAMPLERS": "diffusion.samplers", "get_sampler": "diffusion.samplers", "nfe": "diffusion.samplers",
    "sigmas_ddpm": "diffusion.schedules", "sigmas_karras": "diffusion.schedules", "cfg_denoiser": "diffusion.guidance",
    # inference and evaluation
    "DiffusionModel": "pipelines.image", "DiffusionModelConfig": "pipelines.image",
    "TextToImage": "pipelines.text_to_image", "StableDiffusion": "pipelines.sd",
    "load_autoencoder": "pipelines.autoencoder", "load_clip": "pipelines.text",
    "AutoencoderKL": "nn.vae", "VAEConfig": "nn.vae", "CLIP": "nn.clip", "CLIPConfig": "nn.clip",
    "clip_score": "metrics.clip_score", "retrieval": "metrics.clip_score",
    "classifier_steer": "pipelines.steering", "clip_steer": "pipelines.steering",
    "evaluate_model": "metrics.evaluate", "evaluate_samples": "metrics.evaluate",
    "fid_from_features": "metrics.fid", "kid_from_features": "metrics.fid",
    "load_feature_network": "metrics.features",
    # training
    "Learner": "learner.learner", "Callback": "learner.callback",
    "ClassifierConfig": "recipes.classifier", "build_classifier": "recipes.classifier",
    "evaluate_accuracy": "recipes.classifier", "predict_mc_dropout": "recipes.classifier",
    "predict_tta": "recipes.classifier", "train_classifier": "recipes.classifier",
    "DiffusionConfig": "recipes.diffusion", "train_diffusion": "recipes.diffusion",
    "DiffusionCB": "recipes.callbacks", "FIDCB": "recipes.callbacks",
    # configs and errors
    "apply_overrides": "config", "from_dict": "config", "load_preset": "config",
    "MinidiffusionError": "errors", "DataError": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "TrainingError": "errors", "OutputError": "errors",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    """Import public API names on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'minidiffusion' has no attribute {name!r}")
    where = _API[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

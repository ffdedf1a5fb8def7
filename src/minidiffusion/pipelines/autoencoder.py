"""Trained autoencoders at inference: load one, reconstruct images, encode a data set into latents once.

`load_autoencoder` takes a run directory or weights file written by the `vae` or `mlp_autoencoder`
recipes, a name shipped in assets/ (`emoji-vae`), or a local diffusers `AutoencoderKL` folder
(a Stable-Diffusion-format VAE, through pipelines/sd_vae.py). All give `encode(x) -> posterior`
(or a code), `decode(z)`, and for the KL autoencoders `encode_latents` / `decode_latents` with the
model's own scale factor. `encode_to_folder` is `minidiffusion encode`: the whole split once,
into a memory-mapped array of posteriors (data/latents.py).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..artifacts import config_from_file, load_state, read_component
from ..data.images import uint8_to_float
from ..data.latents import write_latents
from ..errors import CheckpointError
from ..nn.autoencoder import MLPAutoencoder, MLPAutoencoderConfig
from ..nn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from ..paths import check_writable, sha256_file

__all__ = ["load_autoencoder", "autoencoder_files", "reconstruct", "encode_moments", "encode_to_folder",
           "weights_sha256", "evaluate_autoencoder", "trained_on", "KINDS"]

KINDS = {"vae": (AutoencoderKL, VAEConfig), "mlp-autoencoder": (MLPAutoencoder, MLPAutoencoderConfig)}


def autoencoder_files(path: str | Path) -> Path:
    """Return the weights file of an autoencoder given as a run dir, a .safetensors file or a shipped name."""
    p = Path(path)
    if str(path) and (p.is_dir() or p.suffix in (".safetensors", ".toml")):
        weights = p / "model.safetensors" if p.is_dir() else p.with_suffix(".safetensors")
        if not weights.is_file():
            raise CheckpointError(f"no autoencoder weights at {weights}; give a run directory of `minidiffusion train "
                                  "emoji-vae` (it holds model.safetensors), a shipped name or a diffusers folder")
        return weights
    shipped = resources.files("minidiffusion.assets") / f"{path}.safetensors"
    if shipped.is_file():
        return Path(str(shipped))
    raise CheckpointError(f"no autoencoder at {path}: give a run directory of `minidiffusion train emoji-vae`, its "
                          "model.safetensors, a shipped name (emoji-vae) or a diffusers AutoencoderKL folder")


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Return the autoencoder at `path` (see the module docstring) in eval mode, float32, on `device`."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "model.safetensors").is_file():
        from .sd_vae import DiffusersVAE

        return DiffusersVAE.from_pretrained(p, device=device)
    comp = read_component(autoencoder_files(path))
    if comp.kind not in KINDS:
        raise CheckpointError(f"{comp.weights} holds a {comp.kind or 'model of unknown kind'}, not an autoencoder; "
                              "give a run of the vae or mlp_autoencoder recipe")
    cls, cfg_cls = KINDS[comp.kind]
    cfg = config_from_file(cfg_cls, comp.config, comp.config_path)
    model = load_state(cls(cfg), comp.tensors, f"autoencoder {comp.weights}")
    return model.eval().float().to(device)


def weights_sha256(path: str | Path) -> str:
    """Return the SHA-256 that identifies an autoencoder's weights (its .safetensors, or a diffusers folder's)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "model.safetensors").is_file():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p} holds no .safetensors weights")
        return sha256_file(files[0])
    return sha256_file(autoencoder_files(path))


@torch.no_grad()
def reconstruct(ae: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return reconstructions [N, C, H, W] in [-1, 1] (CPU, float32) of uint8 or [-1, 1] images, through the
    posterior mean (deterministic)."""
    device = next(ae.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size]
        x = (uint8_to_float(x) if x.dtype == torch.uint8 else x.float()).to(device)
        code = ae.encode(x)
        z = code.mode() if isinstance(code, DiagonalGaussian) else code  # MLP autoencoders return the code
        out.append(ae.decode(z).float().clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_moments(vae: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Return the posterior (mean, logvar) of each uint8 image: float32 [N, 2, C, h, w], unscaled."""
    device = next(vae.parameters()).device
    parts = []
    for i in range(0, len(images), batch_size):
        post = vae.encode(uint8_to_float(images[i: i + batch_size]).to(device))
        parts.append(torch.stack([post.mean.float(), post.logvar.float()], dim=1).cpu().numpy())
    return np.concatenate(parts)


def encode_to_folder(vae_path: str | Path, data: str, out: str | Path, split: str = "both", image_size: int = 64,
                     device: torch.device | str = "cpu", batch_size: int = 64) -> dict:
    """Encode data set `data` with the autoencoder at `vae_path` into folder `out`; return a summary.

    `split` "both" writes out/train and out/test (what latent diffusion and the latent classifier
    read); "train" or "test" writes that split into `out` itself. Labels of every kind the set has
    (emoji: group and subgroup) are stored beside the latents.
    """
    if split == "both":
        out = Path(out)
        parts = {s: encode_to_folder(vae_path, data, out / s, s, image_size, device, batch_size)
                 for s in ("train", "test")}
        return {**parts["train"], "latents": str(out), "n_test": parts["test"]["n"]}
    from ..data.sets import load_image_set

    out = Path(out)
    for name in ("latents.f32", "labels.npy", "latents.json"):
        check_writable(out / name)
    vae = load_autoencoder(vae_path, device)
    if not hasattr(vae, "encode_latents"):
        raise CheckpointError(f"{vae_path} is an MLP autoencoder; encode needs a KL autoencoder (the vae recipe) "
                              "or a diffusers AutoencoderKL")
    kinds = ["group", "subgroup"] if data == "emoji" else ["class"]
    first = load_image_set(data, split, image_size=image_size, label=kinds[0] if data == "emoji" else None)
    columns, names = [], {}
    for kind in kinds:
        s = first if kind == kinds[0] else load_image_set(data, split, image_size=image_size, label=kind)
        if s.labels is not None:
            columns.append(s.labels.numpy())
            names[kind] = s.class_names
    labels = np.stack(columns, 1) if columns else np.full((len(first), 0), -1, dtype=np.int64)
    moments = encode_moments(vae, first.images, batch_size)
    write_latents(out, moments, labels, float(vae.scale_factor), weights_sha256(vae_path), data=data, split=split,
                  image_size=first.images.shape[-1], label_kinds=list(names), class_names=names,
                  vae=str(vae_path))
    return {"latents": str(out), "n": int(len(moments)), "shape": list(moments.shape),
            "scale_factor": float(vae.scale_factor), "label_kinds": list(names)}


def trained_on(path: str | Path, default: str = "emoji") -> str:
    """Return the data set an autoencoder run trained on (its config.toml's `data`), else `default`."""
    import tomllib

    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "config.toml"
    try:
        return str(tomllib.loads(cfg.read_text()).get("data", default)) if cfg.is_file() else default
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        return default


def evaluate_autoencoder(path: str | Path, data: str | None = None, n: int = 512, image_size: int = 64,
                         feature_net=None, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Reconstruct `n` held-out images of `data` (default: what the autoencoder trained on) and score them.

    Returns {psnr, ssim, n, data, seconds} plus rfid, rkid, rkid_std when a feature network for these
    images is given or shipped (emoji: assets/emoji-classifier; photos and folders: only with one given).
    """
    import time

    from ..data.sets import load_image_set
    from ..metrics.evaluate import default_feature_network, evaluate_reconstructions

    start = time.time()
    ae = load_autoencoder(path, device)
    data = data or trained_on(path)
    size = 32 if data == "fashion-mnist" else image_size
    images = load_image_set(data, "test", image_size=size, label=None).images[:n]
    if feature_net is None and data in ("fashion-mnist", "emoji"):
        try:
            feature_net = default_feature_network(data, allow_unusual=True)
        except CheckpointError:
            feature_net = None  # reconstruction FID needs a network this installation lacks; PSNR/SSIM still hold
    x = uint8_to_float(images)
    result = evaluate_reconstructions(x, reconstruct(ae, images), feature_net, seed)
    return {**result, "data": data, "seconds": round(time.time() - start, 1)}

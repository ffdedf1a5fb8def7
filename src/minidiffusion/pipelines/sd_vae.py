"""A Stable-Diffusion-format VAE (a local diffusers `AutoencoderKL` folder) behind our `AutoencoderKL` interface.

Needs the optional `sd` extra (diffusers), imported only when a VAE is loaded. Loading never
reaches the network (`local_files_only=True`) and never unpickles (`use_safetensors=True`: a folder
holding only `diffusion_pytorch_model.bin` is refused). The folder is what diffusers'
`save_pretrained` writes: `config.json` beside `diffusion_pytorch_model.safetensors`.

Latents are scaled the way diffusers pipelines scale them: `encode_latents` gives
(z - shift_factor) * scaling_factor, `decode_latents` decodes latents / scaling_factor + shift_factor
(shift_factor 0 when the config has none, as in SD 1.x/2.x and SDXL; SD3 and FLUX set one).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..nn.vae import DiagonalGaussian, decode_float32

__all__ = ["DiffusersVAE", "import_diffusers"]

_INSTALL = "install the sd extra: pip install -e '.[sd]'"


def import_diffusers() -> Any:
    """Return the diffusers module, or raise ConfigError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ConfigError(f"loading a Stable Diffusion VAE needs diffusers ({e}); {_INSTALL}") from None
    return diffusers


def _check_folder(path: Path) -> dict:
    """Return the folder's config.json as a dict, or raise CheckpointError naming what is missing or wrong."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give the local folder a diffusers AutoencoderKL was saved "
                              "to (save_pretrained), holding config.json and diffusion_pytorch_model.safetensors")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json; give a folder written by diffusers' "
                              "AutoencoderKL.save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not readable JSON ({e}); re-save the VAE with save_pretrained") from None
    if not isinstance(config, dict) or config.get("_class_name") not in (None, "AutoencoderKL"):
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfg_path} describes a {found}, not an AutoencoderKL; give the VAE's folder "
                              "(in a full pipeline, its vae/ subfolder)")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} holds no .safetensors weights (pickled .bin files are never loaded); "
                              "convert them with save_pretrained(..., safe_serialization=True)")
    return config


class DiffusersVAE(nn.Module):
    """A diffusers AutoencoderKL with our `AutoencoderKL`'s interface: images (B, C, H, W) in [-1, 1] <-> latents.

    Build it with `DiffusersVAE.from_pretrained(folder)`; the diffusers model is `self.vae`.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scale_factor = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)
        self.latent_channels = int(cfg.latent_channels)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DiffusersVAE:
        """Return the VAE saved (diffusers `save_pretrained`) in the local folder `path`, float32, in eval mode."""
        path = Path(path)
        _check_folder(path)
        diffusers = import_diffusers()
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(
                path, local_files_only=True, use_safetensors=True, torch_dtype=torch.float32,
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)  # no warning without it
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load the diffusers AutoencoderKL in {path} ({first}); re-save it with "
                                  "save_pretrained") from None
        return cls(vae).to(device).eval()

    @property
    def downsample_factor(self) -> int:
        """f: latents are (H/f, W/f) for images (H, W); one halving per down block after the first."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Return q(z | x) for images x (B, C, H, W) in [-1, 1]: a DiagonalGaussian over (B, latent_ch, H/f, W/f)."""
        dist = self.vae.encode(x).latent_dist
        return DiagonalGaussian(dist.mean, dist.logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Return images for unscaled latents z (B, latent_ch, h, w): (B, C, h*f, w*f), unbounded (~[-1, 1])."""
        return self.vae.decode(z).sample

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Return (x_hat (B, C, H, W) unbounded, posterior); x_hat decodes a sample, or the mean if sample=False."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode()), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Return (z - shift_factor) * scale_factor for z the mean (or a sample): (B, latent_ch, H/f, W/f)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.shift_factor) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Return decode(latents / scale_factor + shift_factor) in float32 even under autocast: (B, C, H, W)."""
        return decode_float32(self.decode, latents / self.scale_factor + self.shift_factor, self)

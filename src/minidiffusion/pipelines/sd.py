"""Real Stable Diffusion weights through our pipeline: a local diffusers-format folder, our samplers.

`StableDiffusion.from_pretrained(DIR)` (CLI: `minidiffusion sample --sd DIR --prompt ...`) reads a
folder as `StableDiffusionPipeline.save_pretrained` writes it (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), from disk only: no hub is ever asked. With the `[sd]`
extra (diffusers, transformers). The pieces become ours:

- the U-Net predicts epsilon at discrete timesteps of the scheduler's beta schedule: it becomes a
  denoiser in sigma space through our `DDPMObjective` (the k-diffusion wrapper's idea: sigma ->
  the fractional timestep of that sigma, x -> x / sqrt(1 + sigma^2), x0_hat = x - sigma eps_hat);
- the VAE is `pipelines/sd_vae.DiffusersVAE` (its scaling factor from its config);
- the CLIP text encoder and tokenizer stay transformers' (prompts padded to the tokenizer's
  maximum length, the last hidden state as the context, as the diffusers pipeline does).

So every sampler, guidance, the negative prompt, image-to-image and the decoded previews work on
it. With `sampler="ddim"` the sigmas follow the folder's scheduler config (timestep spacing, steps
offset, `set_alpha_to_one`), the starting latents are drawn as diffusers draws them for a CPU
generator with the same seed (`randn(n, 4, h, w)` for the batch, then scaled by sqrt(1 + sigma^2)),
and image-to-image samples the posterior with that generator first: the result equals diffusers'
`StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` (tests/test_sd.py). (So, unlike our
own models, image k of a Stable Diffusion call depends on the batch size, as in diffusers.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import apply_overrides
from ..errors import CheckpointError, ConfigError
from .image import DiffusionModel, DiffusionModelConfig
from .text_to_image import TextToImage

__all__ = ["StableDiffusion", "SDUNet", "HFTextEncoder", "sd_config"]


def _diffusers():
    from .sd_vae import import_diffusers

    return import_diffusers()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("loading Stable Diffusion needs transformers: install the sd extra: "
                          "pip install -e '.[sd]'") from None
    return transformers


class SDUNet(nn.Module):
    """A diffusers UNet2DConditionModel as our network: (x_in, timestep (B,), context, ...) -> epsilon."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample  # SD 1.x does not mask its text tokens


class HFTextEncoder(nn.Module):
    """transformers' CLIPTextModel + CLIPTokenizer behind our text-encoder interface (frozen)."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self._vocab = int(model.config.vocab_size)  # before any added token (the fingerprint covers these rows)

    @property
    def width(self) -> int:
        """D of the context: the text model's hidden size."""
        return int(self.model.config.hidden_size)

    @property
    def context(self) -> int:
        """T: prompts are padded to the tokenizer's maximum length (77 for Stable Diffusion)."""
        return int(self.tokenizer.model_max_length)

    def train(self, mode: bool = True) -> HFTextEncoder:
        """Stay in eval mode (a frozen encoder)."""
        return super().train(False)

    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids int64 [B, T], mask bool [B, T]), padded to the maximum length as the diffusers pipeline does."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        t = self.tokenizer(texts, padding="max_length", max_length=self.context, truncation=True, return_tensors="pt")
        return t.input_ids, t.attention_mask.bool()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (last hidden state [B, T, D], pooled [B, D]); the mask is not passed on (as in SD 1.x)."""
        out = self.model(ids)
        return out[0], out[1]

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding table (what textual inversion learns rows of)."""
        return self.model.get_input_embeddings()

    def token_ids(self, text: str) -> list[int]:
        """Return the ids of `text`'s tokens without the start and end tokens."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def add_tokens(self, tokens: Sequence[str], vectors: torch.Tensor) -> list[int]:
        """Add `tokens` to the CLIP tokenizer and their embedding rows `vectors`; return their ids."""
        self.tokenizer.add_tokens(list(tokens))
        ids = self.tokenizer.convert_tokens_to_ids(list(tokens))
        if max(ids) >= self.embedding.num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer))
        with torch.no_grad():
            self.embedding.weight[ids] = vectors.to(self.embedding.weight)
        return ids

    def fingerprint(self) -> str:
        """Return a SHA-256 naming this encoder: its config and its original embedding rows."""
        import hashlib

        h = hashlib.sha256(self.model.config.to_json_string().encode())
        rows = self.embedding.weight[: self._vocab].detach().float().cpu().contiguous()
        h.update(rows.numpy().tobytes())
        return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a Stable Diffusion folder holds model_index.json and the "
                              "unet, vae, text_encoder, tokenizer and scheduler sub-folders") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the file") from None


def sd_config(scheduler: dict, unet_config: dict, vae_factor: int) -> DiffusionModelConfig:
    """Return the DiffusionModelConfig that describes a Stable Diffusion U-Net: a DDPM (epsilon) objective on
    the scheduler's betas; latents of the U-Net's sample size; DDIM in 50 steps at guidance 7.5 by default."""
    schedule = scheduler.get("beta_schedule", "linear")
    if schedule not in ("linear", "scaled_linear") or scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError(f"this Stable Diffusion scheduler ({schedule}, {scheduler.get('prediction_type')}) is not "
                          "supported: only epsilon prediction on linear or scaled_linear betas (SD 1.x, 2.x base)")
    overrides = [f"timesteps={int(scheduler.get('num_train_timesteps', 1000))}",
                 f"beta_start={float(scheduler.get('beta_start', 0.00085))}",
                 f"beta_end={float(scheduler.get('beta_end', 0.012))}", f'beta_schedule="{schedule}"',
                 'objective="ddpm"', f"image_size={int(unet_config.get('sample_size', 64))}", "channels_last=false",
                 'sampler="ddim"', "steps=50", "guidance=7.5", 'data="stable-diffusion"',
                 f"model.in_channels={int(unet_config.get('in_channels', 4))}",
                 f"model.context_dim={int(unet_config.get('cross_attention_dim', 768))}"]
    return apply_overrides(DiffusionModelConfig(), overrides)


class StableDiffusion(TextToImage):
    """A diffusers Stable Diffusion folder as a TextToImage pipeline (see the module docstring)."""

    def __init__(self, model: DiffusionModel, text_encoder: nn.Module, scheduler: dict):
        super().__init__(model, text_encoder)
        self.scheduler = scheduler

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> StableDiffusion:
        """Load a local diffusers-format Stable Diffusion folder (never the network)."""
        from .sd_vae import DiffusersVAE

        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"no Stable Diffusion folder at {folder}; give the folder that "
                                  "StableDiffusionPipeline.save_pretrained wrote (it holds model_index.json)")
        _read_json(folder / "model_index.json")
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
        diffusers, transformers = _diffusers(), _transformers()
        try:
            unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
            text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the Stable Diffusion folder {folder} ({str(e).splitlines()[0]}); "
                                  "check that its sub-folders are complete") from None
        vae = DiffusersVAE.from_pretrained(folder / "vae", device=device)
        cfg = sd_config(scheduler, dict(unet.config), vae.downsample_factor)
        model = DiffusionModel(SDUNet(unet.eval().requires_grad_(False)), cfg, device=device, vae=vae)
        return cls(model, HFTextEncoder(text, tokenizer), scheduler)

    def sampling_sigmas(self, steps: int, sampler: str) -> torch.Tensor:
        """DDIM/DDPM: the scheduler's own timesteps (spacing, offset, final alpha); others: Karras over its range."""
        from ..diffusion.schedules import sigmas_ddpm

        if sampler in ("ddim", "ddpm"):
            spacing = self.scheduler.get("timestep_spacing", "leading")
            return sigmas_ddpm(steps, self.model.objective.alpha_bars, spacing,
                               offset=int(self.scheduler.get("steps_offset", 0)),
                               alpha_to_one=bool(self.scheduler.get("set_alpha_to_one", True)))
        return super().sampling_sigmas(steps, sampler)

    def start(self, n: int, seed: int, sigma: float, generator: torch.Generator,
              z0: torch.Tensor | None = None) -> torch.Tensor:
        """Draw as diffusers does: one randn [n, C, h, w] from the call's generator (after the posterior sample of
        image-to-image): text-to-image starts at randn x sqrt(1 + sigma^2) (VP randn in our VE scaling),
        image-to-image at z0 + sigma x randn (its add_noise). Image k therefore depends on n, as in diffusers."""
        c, s = self.cfg.model.in_channels, self.cfg.image_size
        noise = torch.randn(n, c, s, s, generator=generator, device=self.model.device)
        if z0 is None:
            return noise * math.sqrt(1 + sigma**2)
        return z0.expand(n, -1, -1, -1) + noise * sigma

    def finish(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """A sample that stops at sigma > 0 (set_alpha_to_one = False) goes back to the VP scaling the VAE reads."""
        return latents / math.sqrt(1 + sigma**2)

    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return scaled latents of a sample of the posterior (drawn with `generator` first, as diffusers does)."""
        from ..data.images import check_range

        image = image[None] if image.dim() == 3 else image
        check_range(image, "init image", allow_unusual=True)
        with torch.no_grad():
            return self.model.vae.encode_latents(image.to(self.model.device).float(), sample=True,
                                                 generator=generator)

"""Text-to-image, the Stable Diffusion workflow: prompt -> tokens -> text encoder -> U-Net on latents -> VAE.

`TextToImage.from_run(dir)` loads a pipeline folder: the U-Net (`model.safetensors` + `model.toml`,
a diffusion model whose U-Net attends to text), the VAE (`vae.*`), the text encoder and its
tokenizer (`text_encoder.*`, `tokenizer.json`; or MiniLM). Calling it reads as the user's view of
Stable Diffusion (lesson 9):

    images = pipe("a red apple", negative_prompt="green", guidance=7.5, steps=20, seed=0, n=4)

- The negative prompt replaces the empty prompt as the unconditional branch of classifier-free
  guidance; with guidance 1 only the prompt's branch runs, so it is ignored.
- Seeds: image k of a call uses seed + k for its starting noise (A1111's convention), so it is the
  same image whether made alone or in a batch. Stochastic samplers also draw their added noise per
  image (each image runs through the sampler on its own generator).
- Image-to-image: the init image is encoded (the posterior mean, scaled) and noised to the level
  that `strength` selects: of the `steps` steps of the schedule, the last int(steps x strength)
  run, starting from sigma[steps - int(steps x strength)] (exactly what diffusers and A1111 do:
  strength 0.6 with 20 steps runs 12 steps; others treat strength as a noise level). Strength 1
  starts from the highest sigma (the image is all but ignored); strength 0 runs no step and
  returns the image through the VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import check_number
from ..diffusion.guidance import cfg_denoiser
from ..diffusion.samplers import get_sampler
from ..errors import ConfigError
from .image import DiffusionModel, check_sampling

__all__ = ["TextToImage", "STOCHASTIC", "strength_start"]

STOCHASTIC = frozenset({"ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral"})


def strength_start(steps: int, strength: float) -> int:
    """Return the index of the first sigma image-to-image starts from: steps - int(steps * strength), in 0..steps
    (diffusers' rule, float rounding included)."""
    check_number("strength", strength, lo=0.0, hi=1.0)
    return steps - min(int(steps * strength), steps)


class TextToImage:
    """A text-conditional latent diffusion model with its VAE, text encoder and tokenizer."""

    def __init__(self, model: DiffusionModel, text_encoder):
        if model.vae is None or not model.cfg.model.context_dim:
            raise ConfigError("TextToImage needs a latent diffusion model whose U-Net attends to text (context_dim)")
        self.model, self.text_encoder = model, text_encoder.to(model.device)
        self.expansions: dict[str, str] = {}  # a learned multi-vector token -> the tokens that carry its vectors

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | str = "cpu") -> TextToImage:
        """Load a text-to-image run directory (or pipeline folder) written by `train emoji-t2i`."""
        from .text import load_text_encoder

        model = DiffusionModel.from_run(run_dir, device=device)
        return cls(model, load_text_encoder(run_dir, device))

    @classmethod
    def from_pretrained(cls, name: str = "emoji", device: torch.device | str = "cpu") -> TextToImage:
        """Load a pipeline shipped with the package (the folder assets/NAME/)."""
        from importlib import resources

        folder = resources.files("minidiffusion.assets") / name
        if not (folder / "model.safetensors").is_file():
            raise ConfigError(f"no shipped text-to-image pipeline {name!r}; train one with `minidiffusion train "
                              "emoji-t2i --out DIR` and load DIR")
        with resources.as_file(folder) as path:
            return cls.from_run(path, device)

    @property
    def cfg(self):
        """The model's DiffusionModelConfig (sampling defaults, image size of the latents)."""
        return self.model.cfg

    def expand(self, prompt: str) -> str:
        """Return `prompt` with each learned multi-vector token written out as all of its tokens."""
        for token, tokens in self.expansions.items():
            prompt = prompt.replace(token, tokens)
        return prompt

    def load_embedding(self, path: str | Path) -> list[str]:
        """Add the token(s) learned by `minidiffusion textual-inversion` (an EMB.safetensors) to this pipeline;
        return the token names. Refused when the embedding was learned for another text encoder."""
        from .textual_inversion import load_embedding

        return load_embedding(self, path)

    def conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return the U-Net's text inputs for prompts: {context (B, T, D), context_mask (B, T)[, pooled (B, D)]}."""
        ids, mask = self.text_encoder.encode([self.expand(p) for p in prompts])
        states, pooled = self.text_encoder(ids.to(self.model.device), mask.to(self.model.device))
        cond = {"context": states.float(), "context_mask": mask.to(self.model.device)}
        if self.model.cfg.model.pooled_dim:
            cond["pooled"] = pooled.float()
        return cond

    def denoiser(self, prompt: str, negative_prompt: str | None = None, guidance: float = 1.0,
                 precision: str = "fp32", rescale: float = 0.0) -> Callable[..., torch.Tensor]:
        """Return D(x, sigma) -> x0_hat on latents, guided towards `prompt` and away from `negative_prompt`
        (`rescale`: guidance rescale, Lin et al. 2024, 0 = off)."""
        from ..device import with_autocast

        base = with_autocast(self.model.objective.denoiser(self.model.net), self.model.device, precision)
        cond = self.conditioning([prompt])
        if guidance == 1.0:
            return lambda x, sigma: base(x, sigma, **{k: v.expand(len(x), *v.shape[1:]) for k, v in cond.items()})
        uncond = self.conditioning([negative_prompt or ""])
        return cfg_denoiser(base, cond, uncond, guidance, rescale=rescale)

    def encode_image(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return the scaled latents [1, C, h, w] of one image [1, 3, H, W] (or [3, H, W]) in [-1, 1]: the
        posterior mean (a pipeline that samples the posterior, as diffusers does, uses `generator`)."""
        from ..data.images import check_range

        image = image[None] if image.dim() == 3 else image
        check_range(image, "init image", allow_unusual=True)
        with torch.no_grad():
            return self.model.vae.encode_latents(image.to(self.model.device).float())

    def sampling_sigmas(self, steps: int, sampler: str) -> torch.Tensor:
        """Return the steps + 1 sigmas the sampler runs over (the objective's choice for this sampler)."""
        return self.model.objective.sampling_sigmas(steps, sampler)

    def start(self, n: int, seed: int, sigma: float, generator: torch.Generator,
              z0: torch.Tensor | None = None) -> torch.Tensor:
        """Return the sampler's starting point [n, C, h, w] at noise level `sigma`: noise (image k from a generator
        seeded seed + k) times sigma, plus the init image's latents `z0` for image-to-image. (`generator` is
        the call's own, for pipelines that draw as diffusers does.)"""
        c, s, device = self.cfg.model.in_channels, self.cfg.image_size, self.model.device
        noise = [torch.randn(1, c, s, s, generator=torch.Generator(device).manual_seed(seed + k), device=device)
                 for k in range(n)]
        x = torch.cat(noise) * sigma
        return x if z0 is None else x + z0.expand(n, -1, -1, -1)

    def finish(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """Return the latents the VAE decodes from the sampler's result at noise level `sigma` (0: itself)."""
        return latents

    @torch.no_grad()
    def __call__(self, prompt: str, n: int = 1, negative_prompt: str | None = None, guidance: float | None = None,
                 steps: int | None = None, sampler: str | None = None, seed: int = 0,
                 init_image: torch.Tensor | None = None, strength: float = 0.6, callback=None,
                 precision: str = "auto", rescale: float = 0.0, steer: Callable | None = None) -> torch.Tensor:
        """Return n images [n, 3, H, W] in [-1, 1] (CPU) for `prompt` (see the module docstring for the settings).

        `callback(info)` gets each step's sampler report plus `image` (its index in this call); its
        `denoised` holds latents: decode them with `self.model.to_images`. `rescale` is guidance rescale
        (0 = off, 0.7 in its paper); `steer(denoiser) -> denoiser` adds e.g. CLIP guidance (pipelines/steering.py).
        """
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
        sampler, steps, guidance = self.model.settings(sampler, steps, guidance)
        check_sampling(n=n, seed=seed)
        sigmas = self.sampling_sigmas(steps, sampler)
        start = 0
        z0 = None
        device = self.model.device
        gen = torch.Generator(device).manual_seed(seed)  # the posterior sample of a diffusers-style image-to-image
        if init_image is not None:
            start = strength_start(steps, strength)
            z0 = self.encode_image(init_image, gen)
            if start == len(sigmas) - 1:
                return self.model.to_images(self.finish(z0, 0.0)).expand(n, -1, -1, -1).cpu().clone()
        sigmas = sigmas[start:]
        den = self.denoiser(prompt, negative_prompt, guidance, precision, rescale)
        den = steer(den) if steer is not None else den
        fn = get_sampler(sampler)
        x = self.start(n, seed, float(sigmas[0]), gen, z0)

        def report(k):
            return None if callback is None else (lambda info: callback({**info, "image": k}))

        if sampler in STOCHASTIC:  # each image on its own generator: the same image at any batch size
            out = [fn(den, x[k: k + 1], sigmas, generator=torch.Generator(device).manual_seed(seed + k),
                      callback=report(k)) for k in range(n)]
            latents = torch.cat(out)
        else:
            latents = fn(den, x, sigmas, generator=gen, callback=report(None))
        return self.model.to_images(self.finish(latents, float(sigmas[-1]))).cpu()

    def progression(self, path: str | Path, prompt: str, frames: int = 8, **kw) -> Path:
        """Write a PNG: one row, the decoded prediction at `frames` steps, then the final image; return the path."""
        from ..data.images import save_grid

        _, steps, _ = self.model.settings(kw.get("sampler"), kw.get("steps"), kw.get("guidance"))
        keep = set(torch.linspace(0, steps - 1, min(frames, steps)).round().long().tolist())
        seen: list[torch.Tensor] = []

        def record(info):
            if info["i"] in keep and info["image"] in (None, 0):
                seen.append(self.model.to_images(info["denoised"][:1]).cpu())

        x = self(prompt, n=1, callback=record, **kw)
        return save_grid(torch.cat(seen + [x]), path, nrow=len(seen) + 1, scale=2)

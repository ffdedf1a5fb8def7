"""Scorers for gradient guidance (diffusion/guidance.py): what a sampler is steered towards.

The lesson's "magic function": a model that scores an image gives, through its gradient with
respect to the pixels, a direction that makes the image score higher. Each function here returns
`log_prob(x0_hat) -> (B,)` for `gradient_guidance`, or a `steer` callable the pipelines apply to
their denoiser:

- `classifier_log_prob`: log p(y | x0_hat) from a classifier's logits (classifier guidance,
  Dhariwal & Nichol 2021): steer an unconditional model to a class.
- `clip_log_prob`: the CLIP similarity of the decoded estimate to a prompt, times a temperature
  (CLIP guidance): steer a text-to-image model further towards its prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.guidance import gradient_guidance

__all__ = ["classifier_log_prob", "classifier_steer", "clip_log_prob", "clip_steer"]


def classifier_log_prob(classifier: nn.Module, labels: Tensor) -> Callable[[Tensor], Tensor]:
    """Return x0 -> log p(labels | x0) (B,) under `classifier` (images [B, C, H, W] in [-1, 1] -> logits)."""
    def log_prob(x0: Tensor) -> Tensor:
        logits = classifier(x0.clamp(-1, 1)).float()
        return F.log_softmax(logits, dim=1).gather(1, labels.to(logits.device).view(-1, 1)).squeeze(1)

    return log_prob


def classifier_steer(classifier: nn.Module, scale: float, target: int | None = None) -> Callable:
    """Return `steer(denoiser, ids) -> denoiser` for DiffusionModel.sample: classifier guidance towards class
    `target`, or (None) towards each image's own label id of the call (e.g. balanced labels sampled with
    guidance=0, the model's unconditional branch)."""
    classifier.eval().requires_grad_(False)

    def steer(denoiser, ids=None):
        def wrap(x, sigma, **cond):
            y = torch.full((len(x),), target, dtype=torch.long) if target is not None else ids
            if y is None:
                raise ValueError("classifier_steer needs a target class, or label ids from a conditional model")
            return gradient_guidance(denoiser, classifier_log_prob(classifier, y), scale)(x, sigma, **cond)

        return wrap

    return steer


def clip_log_prob(clip, tokenizer, prompt: str, decode: Callable[[Tensor], Tensor] | None = None,
                  temperature: float = 100.0) -> Callable[[Tensor], Tensor]:
    """Return x0 -> temperature * cos(CLIP image embedding of decode(x0), CLIP text embedding of `prompt`) (B,).

    `decode` turns the estimate into images in [-1, 1] (a VAE's decode for latents; None for pixels).
    """
    clip.eval().requires_grad_(False)
    with torch.no_grad():
        ids, mask = tokenizer.encode([prompt])
        device = next(clip.parameters()).device
        text = clip.encode_text(ids.to(device), mask.to(device)).float()

    def log_prob(x0: Tensor) -> Tensor:
        images = decode(x0) if decode is not None else x0
        return temperature * (clip.encode_image(images.clamp(-1, 1)).float() * text).sum(1)

    return log_prob


def clip_steer(clip, tokenizer, prompt: str, scale: float, vae=None) -> Callable:
    """Return `steer(denoiser) -> denoiser` for TextToImage: CLIP guidance towards `prompt` on top of
    classifier-free guidance (latents are decoded by `vae` inside the gradient)."""
    decode = (lambda z: vae.decode(z / vae.scale_factor)) if vae is not None else None
    log_prob = clip_log_prob(clip, tokenizer, prompt, decode)
    return lambda denoiser: gradient_guidance(denoiser, log_prob, scale)

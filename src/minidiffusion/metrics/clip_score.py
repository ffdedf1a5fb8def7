"""What a CLIP measures: retrieval between images and captions, zero-shot classification, CLIP score.

All take a trained `CLIP` (nn/clip.py) with its `Tokenizer`, images float32 [N, 3, S, S] in [-1, 1]
and texts, and work in batches without gradients.

- `retrieval`: among N images and their N captions, how often the right one ranks first / in the
  top 5, text -> image and image -> text (chance: 1/N and 5/N).
- `zero_shot_accuracy`: classify each image by the most similar of the class prompts.
- `clip_score`: 100 x the mean cosine similarity of each image to its prompt, floored at 0 (Hessel
  et al. 2021's CLIPScore without their 2.5 factor): prompt adherence of generated images, to be
  compared with the same score of real images for the same prompts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.images import check_range

__all__ = ["image_embeddings", "text_embeddings", "retrieval", "zero_shot_accuracy", "clip_score"]


@torch.no_grad()
def image_embeddings(clip, images: Tensor, batch_size: int = 256) -> Tensor:
    """Return unit-length image embeddings, float32 [N, E] (CPU), of images [N, 3, S, S] in [-1, 1]."""
    check_range(images, "CLIP images", allow_unusual=True)
    clip.eval()
    device = next(clip.parameters()).device
    return torch.cat([clip.encode_image(images[i: i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def text_embeddings(clip, tokenizer, texts: list[str], batch_size: int = 512) -> Tensor:
    """Return unit-length text embeddings, float32 [N, E] (CPU), of N texts."""
    clip.eval()
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer.encode(texts[i: i + batch_size])
        out.append(clip.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def _top_k(sim: Tensor, k: int) -> float:
    """Fraction of rows whose own index (the diagonal) is among the k largest entries."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return float((top == torch.arange(len(sim))[:, None]).any(1).float().mean())


def retrieval(clip, tokenizer, images: Tensor, captions: list[str]) -> dict:
    """Return {t2i_top1, t2i_top5, i2t_top1, i2t_top5, n, chance_top1, chance_top5} for matching pairs
    (image i belongs with caption i); all fractions in [0, 1]."""
    if len(images) != len(captions):
        raise ValueError(f"retrieval needs one caption per image, got {len(images)} images and {len(captions)}")
    sim = image_embeddings(clip, images) @ text_embeddings(clip, tokenizer, captions).T  # [N images, N texts]
    n = len(images)
    return {"t2i_top1": _top_k(sim.T, 1), "t2i_top5": _top_k(sim.T, 5), "i2t_top1": _top_k(sim, 1),
            "i2t_top5": _top_k(sim, 5), "n": n, "chance_top1": 1 / n, "chance_top5": min(5, n) / n}


def zero_shot_accuracy(clip, tokenizer, images: Tensor, labels: Tensor, class_prompts: list[str]) -> float:
    """Return the fraction (0..1) of images whose most similar class prompt is their label's."""
    sim = image_embeddings(clip, images) @ text_embeddings(clip, tokenizer, class_prompts).T
    return float((sim.argmax(1) == labels.cpu()).float().mean())


def clip_score(clip, tokenizer, images: Tensor, prompts: list[str]) -> float:
    """Return 100 x mean(max(cos(image_i, prompt_i), 0)) over the pairs: higher = closer to the prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score needs one prompt per image, got {len(images)} images and {len(prompts)}")
    cos = (image_embeddings(clip, images) * text_embeddings(clip, tokenizer, prompts)).sum(1)
    return float(100 * cos.clamp(min=0).mean())

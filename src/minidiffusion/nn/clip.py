"""A small CLIP: an image tower and a text tower trained so that matching image/caption pairs point the same way.

Radford et al. 2021. Each tower ends in a linear projection (no bias) into a shared `embed_dim`
space, and both embeddings are L2-normalised, so `image @ text.T` is a matrix of cosine
similarities. Multiplied by a learned temperature `exp(logit_scale)` they are the logits of a
classification in both directions: each image must pick its caption among the batch's captions
(rows), and each caption its image (columns). `clip_loss` is the mean of the two cross-entropies
(InfoNCE). As in CLIP the log temperature starts at log(1/0.07) and is clamped at log(100), so the
logits are never scaled by more than 100 (larger scales made CLIP's training unstable).

The image tower is our ResNet (`nn/resnet.py`) on RGB images, its pooled `features()` (the
classification head is removed); the text tower is `nn/text.py`'s TextEncoder, its pooled state at
the <end> token. Images are float32 (B, 3, S, S) in [-1, 1]; ids and mask come from
`data.tokenizer.Tokenizer.encode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number
from .resnet import ResNet, ResNetConfig
from .text import TextEncoder, TextEncoderConfig

__all__ = ["CLIPConfig", "CLIP", "clip_loss", "image_tower_config"]

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the scale at 100


def image_tower_config() -> ResNetConfig:
    """Return the default image tower: a ResNet for 64x64 RGB images, (32, 64, 128, 256) channels, no dropout."""
    return ResNetConfig(in_channels=3, n_classes=1, channels=(32, 64, 128, 256), blocks=(1, 1, 1),
                        dropout=0.0, image_size=64)


@dataclass
class CLIPConfig:
    """Architecture of `CLIP`: the text tower (its vocabulary from the tokenizer), the image tower, the shared
    embedding size and the temperature's start and cap (natural logs of the logit scale)."""

    text: TextEncoderConfig
    image: ResNetConfig = field(default_factory=image_tower_config)
    embed_dim: int = 256
    init_logit_scale: float = INIT_LOGIT_SCALE
    max_logit_scale: float = MAX_LOGIT_SCALE

    def __post_init__(self):
        check_number("embed_dim", self.embed_dim, lo=1, hi=16384, integer=True)
        check_number("max_logit_scale", self.max_logit_scale, lo=0.0, hi=20.0)
        check_number("init_logit_scale", self.init_logit_scale, lo=0.0, hi=self.max_logit_scale)


class CLIP(nn.Module):
    """Image and text towers projected into one space: `forward(images, ids, mask)` -> logits_per_image (B, B).

    Row i of the logits scores image i against every caption; the diagonal holds the matching pairs.
    """

    def __init__(self, cfg: CLIPConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or CLIPConfig(**kwargs)
        self.image = ResNet(cfg.image)
        self.image.head = nn.Identity()  # only features() is used; no unused parameters
        self.text = TextEncoder(cfg.text)
        self.image_proj = nn.Linear(self.image.n_features, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.image.n_features ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text.width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Return unit-length image embeddings, float (B, embed_dim), for images (B, 3, S, S) in [-1, 1]."""
        return F.normalize(self.image_proj(self.image.features(images)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return unit-length text embeddings, float (B, embed_dim), for token ids and mask (B, T)."""
        return F.normalize(self.text_proj(self.text(ids, mask)[1]), dim=-1)

    def scale(self) -> torch.Tensor:
        """Return the temperature exp(logit_scale) as a 0-d tensor, clamped to [1, exp(max_logit_scale)]."""
        return self.logit_scale.clamp(0.0, self.cfg.max_logit_scale).exp()

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        img, txt = self.encode_image(images), self.encode_text(ids, mask)
        return self.scale() * img.float() @ txt.float().T  # (B, B), in [-scale, scale]


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Return the symmetric InfoNCE loss, a float32 scalar >= 0: the mean of the cross-entropy of each row
    (image -> its caption) and of each column (caption -> its image), the matching pair on the diagonal."""
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"clip_loss needs a square (B, B) matrix of image-text logits, got "
                         f"{tuple(logits_per_image.shape)}")
    logits = logits_per_image.float()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

"""A ResNet for small (32x32) images: the Fashion-MNIST classifier and FID feature network.

Shape walk for the default config (channels=(32, 64, 128, 256), 1x32x32 input):
    stem  conv 1->32            (B, 32, 32, 32)   (+ `stem_blocks` ResBlocks at full resolution)
    stage 2 ResBlocks, stride 2 (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 256, 4, 4)
    head  global avg pool -> dropout -> linear (B, 10)
With `crop=28` the network first cuts the 28x28 centre out of its 32x32 input (the padding
carries no information), so the stages run at 14x14, 7x7 and 4x4: ~12% less compute per image.
`features(x)` returns the pooled (B, 256) activations, the penultimate layer used for FID/KID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import check_number
from .init import init_kaiming
from .layers import ResBlock, conv, match_memory_format

__all__ = ["ResNetConfig", "ResNet"]

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


@dataclass
class ResNetConfig:
    """Architecture of `ResNet`. Wider channels buy accuracy at a quadratic cost in compute."""

    # options that did not beat the preset, removed (config.py): name -> (the value meaning "off", last commit)
    removed: ClassVar[dict] = {"ghost_batch": (0, "f91f512"), "se": (0, "f91f512"), "resize": (0, "f91f512")}

    in_channels: int = 1
    n_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128, 256)  # stem width, then one stage per further entry
    blocks: tuple[int, ...] = (1, 1, 1)  # ResBlocks per stage; the first of each stage has stride 2
    stem_blocks: int = 0  # ResBlocks at the stem's width and the full input resolution (stride 1)
    act: str = "relu"
    preact: bool = False
    dropout: float = 0.1  # before the final linear layer
    dropout2d: float = 0.0  # drops whole input channels at the start (only useful with >1 channel)
    crop: int = 0  # >0: center-crop the input to crop x crop first (28 drops Fashion-MNIST's padding)
    pool: str = "avg"  # avg: global average of the last stage; flatten: keep where features are
    image_size: int = 32  # input height = width; only `pool = "flatten"` depends on it

    def __post_init__(self):
        self.channels, self.blocks = tuple(self.channels), tuple(self.blocks)
        if len(self.blocks) != len(self.channels) - 1:
            raise ValueError(f"ResNetConfig: blocks has {len(self.blocks)} entries but channels defines "
                             f"{len(self.channels) - 1} stages; give one block count per stage")
        if len(self.channels) < 2:
            raise ValueError("ResNetConfig: channels needs a stem width and at least one stage, e.g. [32, 64]")
        for c in self.channels:
            check_number("channels (each entry)", c, lo=1, hi=4096, integer=True)
        for b in self.blocks:
            check_number("blocks (each entry)", b, lo=1, hi=64, integer=True)
        check_number("in_channels", self.in_channels, lo=1, hi=64, integer=True)
        check_number("n_classes", self.n_classes, lo=1, hi=1_000_000, integer=True)
        check_number("stem_blocks", self.stem_blocks, lo=0, hi=64, integer=True)
        check_number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        check_number("dropout2d", self.dropout2d, lo=0.0, hi=1.0, hi_open=True)
        check_number("image_size", self.image_size, lo=1, hi=4096, integer=True)
        if self.crop < 0:
            raise ValueError(f"ResNetConfig: crop must be 0 (off) or a positive size, got {self.crop}")
        if self.pool not in ("avg", "flatten"):
            raise ValueError(f"ResNetConfig: pool must be 'avg' or 'flatten', got {self.pool!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ResNetConfig: act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")


class ResNet(nn.Module):
    """Image classifier: [B, C, H, W] in [-1, 1] -> logits [B, n_classes]."""

    def __init__(self, cfg: ResNetConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or ResNetConfig(**kwargs)
        act = ACTIVATIONS[cfg.act]
        norm = nn.BatchNorm2d
        layers: list[nn.Module] = [nn.Dropout2d(cfg.dropout2d)] if cfg.dropout2d else []
        layers.append(conv(cfg.in_channels, cfg.channels[0], ks=5, act=act, norm=norm))
        layers += [ResBlock(cfg.channels[0], cfg.channels[0], act=act, norm=norm, preact=cfg.preact)
                   for _ in range(cfg.stem_blocks)]
        for ni, nf, nb in zip(cfg.channels[:-1], cfg.channels[1:], cfg.blocks, strict=True):
            layers.append(ResBlock(ni, nf, stride=2, act=act, norm=norm, preact=cfg.preact))
            layers += [ResBlock(nf, nf, act=act, norm=norm, preact=cfg.preact) for _ in range(nb - 1)]
        if cfg.preact:  # pre-activation nets end with one more norm + activation
            layers += [norm(cfg.channels[-1]), act()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.n_features, cfg.n_classes))
        init_kaiming(self, nonlinearity="relu")

    @property
    def stem(self) -> nn.Conv2d:
        """The first convolution: the only one that sees the input image."""
        return next(m for m in self.body.modules() if isinstance(m, nn.Conv2d))

    @property
    def n_features(self) -> int:
        """Length of `features(x)`: channels[-1], times the last stage's h*w when pool = "flatten"."""
        side = self.cfg.crop or self.cfg.image_size
        for _ in self.cfg.blocks:  # each stage halves the side (rounding up: stride 2, padding 1)
            side = (side + 1) // 2
        return self.cfg.channels[-1] * (side * side if self.cfg.pool == "flatten" else 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate features [B, n_features]: the last stage averaged (or flattened)."""
        h = self.body(match_memory_format(self._crop(x), self.body))
        if self.cfg.pool == "flatten":
            if h.shape[1] * h.shape[2] * h.shape[3] != self.n_features:
                raise ValueError(f"ResNet(pool='flatten') was built for {self.cfg.image_size}x{self.cfg.image_size} "
                                 f"inputs, got {tuple(x.shape[-2:])}")
            return h.flatten(1)
        return h.mean(dim=(2, 3))

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.crop
        if not c:
            return x
        h, w = x.shape[-2:]
        if c > h or c > w:
            raise ValueError(f"ResNet: crop={c} is larger than the {h}x{w} input")
        top, left = (h - c) // 2, (w - c) // 2
        return x[..., top: top + c, left: left + c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

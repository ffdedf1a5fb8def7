"""The diffusion U-Net: x (B, C, H, W) and a noise level (B,) -> a tensor shaped like x.

What the output means (eps, v, x0, EDM's F) and what `noise_level` is (a DDPM timestep, ln(sigma)/4)
belong to the training objective (`diffusion/objectives.py`); the network only has to be fast.
Shape walk for the default config (channels=(32, 64, 128), blocks=(1, 1, 2), 1x32x32 input):

    stem   3x3 conv 1->32                                          (B, 32, 32, 32)
    down   L0: 1 block, saved; strided conv                        (B, 32, 16, 16)
           L1: 1 block (32->64), saved; strided conv               (B, 64, 8, 8)
           L2: 2 blocks (64->128) + attention, each saved          (B, 128, 8, 8)
    mid    2 blocks + attention                                    (B, 128, 8, 8)
    up     L2: 2 blocks on concat(h, skip) 256->128 + attention    (B, 128, 8, 8)
               2x nearest, 3x3 conv 128->64                        (B, 64, 16, 16)
           L1: 1 block on concat(h, skip) 128->64; up, conv 64->32 (B, 32, 32, 32)
           L0: 1 block on concat(h, skip) 64->32                   (B, 32, 32, 32)
    out    GroupNorm, SiLU, 3x3 conv 32->1 (zero-initialised)      (B, 1, 32, 32)

Every block is a pre-activation ResBlock whose second GroupNorm is scaled and shifted by the
noise (+ label) embedding. Compute goes where it is cheap ("simple diffusion", Hoogeboom et al.
2023): a 3x3 conv 32->32 at 32x32 costs the FLOPs of a 128->128 one at 8x8, but on CPU it runs
at a lower FLOP rate (narrow convolutions vectorise poorly), and norms, activations and memory traffic scale with
pixels x channels, 4x more at 32x32x32 than at 8x8x128. So the full-resolution level is thin and
shallow and the depth sits at 8x8, where attention over 64 tokens is cheap too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_number
from .attention import SelfAttention2d
from .cross_attention import CrossAttention2d
from .embedding import NoiseEmbedding
from .layers import group_norm, match_memory_format
from .transformer import TransformerMid

__all__ = ["UNetConfig", "EmbResBlock", "UNet", "drop_labels"]


@dataclass
class UNetConfig:
    """Architecture of `UNet`. Each level halves the resolution; wider/deeper low levels are cheap."""

    in_channels: int = 1
    out_channels: int | None = None  # None: same as in_channels (eps, v, x0 and F are all image-shaped)
    channels: tuple[int, ...] = (32, 64, 128)  # width of each level; level i works at H / 2^i
    blocks: tuple[int, ...] = (1, 1, 2)  # ResBlocks per level on the way down (the same number up)
    attention: tuple[bool, ...] | tuple[int, ...] = (-1,)  # level indices (-1: lowest) or a bool per level
    mid_blocks: int = 2  # extra ResBlocks at the lowest resolution, with attention if that level has it
    mid_type: str = "resblock"  # resblock | transformer ("simple diffusion": mid_blocks transformer blocks)
    mid_size: int = 0  # transformer: the side of the lowest-resolution map (its position embedding; 0 = not set)
    head_dim: int = 32  # attention heads = channels // head_dim
    emb_dim: int | None = None  # noise/label embedding width; None: 4 * channels[0]
    noise_level_scale: float = 1.0  # multiplies noise_level before the sinusoids (see nn/embedding.py)
    dropout: float = 0.0  # inside each ResBlock, before its last conv
    norm_groups: int = 8  # GroupNorm groups; must divide every entry of channels
    n_classes: int = 0  # > 0: class-conditional, label n_classes is "no label" (classifier-free guidance)
    context_dim: int = 0  # > 0: text-conditional: cross-attention to a token sequence (B, T, context_dim)
    pooled_dim: int = 0  # > 0: a pooled text vector (B, pooled_dim) is projected and added to the embedding
    downsample: str = "conv"  # "conv": strided 3x3 conv; "avgpool": 2x2 average then 3x3 conv
    cond_channels: int = 0  # > 0: an image of this many channels (B, k, H, W) is concatenated to x at the stem

    def __post_init__(self):
        self.channels, self.blocks = tuple(self.channels), tuple(self.blocks)
        n = len(self.channels)
        if not n:
            raise ValueError("UNetConfig: channels needs at least one level, e.g. [32, 64, 128]")
        for c in self.channels:
            check_number("channels (each entry)", c, lo=1, hi=4096, integer=True)
        for b in self.blocks:
            check_number("blocks (each entry)", b, lo=1, hi=64, integer=True)
        check_number("in_channels", self.in_channels, lo=1, hi=64, integer=True)
        if self.out_channels is not None:
            check_number("out_channels", self.out_channels, lo=1, hi=64, integer=True)
        check_number("mid_blocks", self.mid_blocks, lo=0, hi=64, integer=True)
        check_number("head_dim", self.head_dim, lo=1, hi=4096, integer=True)
        if self.emb_dim is not None:
            check_number("emb_dim", self.emb_dim, lo=1, hi=65_536, integer=True)
        check_number("noise_level_scale", self.noise_level_scale, lo=0.0, lo_open=True)
        check_number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        check_number("norm_groups", self.norm_groups, lo=1, hi=4096, integer=True)
        check_number("n_classes", self.n_classes, lo=0, hi=1_000_000, integer=True)
        check_number("context_dim", self.context_dim, lo=0, hi=65_536, integer=True)
        check_number("pooled_dim", self.pooled_dim, lo=0, hi=65_536, integer=True)
        check_number("cond_channels", self.cond_channels, lo=0, hi=64, integer=True)
        if self.context_dim and not any(self.attention_levels()):
            raise ValueError("UNetConfig: cross-attention (context_dim > 0) sits at the attention levels, and none is "
                             "set; turn attention on for the lowest levels, e.g. attention=[false, true, true]")
        if len(self.blocks) != n:
            raise ValueError(f"UNetConfig: blocks has {len(self.blocks)} entries but channels has {n} "
                             f"levels; give one block count per level")
        self.attention = tuple(self.attention)
        self.attention_levels()  # validates
        for c in self.channels:  # fail now, with the fix, rather than deep inside UNet's construction
            group_norm(c, self.norm_groups)
        if self.mid_type not in ("resblock", "transformer"):
            raise ValueError(f"UNetConfig: mid_type must be 'resblock' or 'transformer', got {self.mid_type!r}")
        check_number("mid_size", self.mid_size, lo=0, hi=4096, integer=True)
        if self.mid_type == "transformer" and self.channels[-1] % self.head_dim:
            raise ValueError(f"UNetConfig: the transformer middle splits {self.channels[-1]} channels into heads "
                             f"of {self.head_dim}; choose a head_dim that divides it")
        if self.downsample not in ("conv", "avgpool"):
            raise ValueError(f"UNetConfig: downsample must be 'conv' or 'avgpool', got {self.downsample!r}")
        for c, att in zip(self.channels, self.attention_levels(), strict=True):
            heads = max(1, c // self.head_dim)
            if att and c % heads:
                raise ValueError(f"UNetConfig: {c} channels cannot be split into {heads} attention heads of "
                                 f"head_dim {self.head_dim}; choose a head_dim that divides the channel counts")

    @property
    def size_factor(self) -> int:
        """Image sides must be multiples of this: each level below the first halves the resolution."""
        return 2 ** (len(self.channels) - 1)

    def attention_levels(self) -> tuple[bool, ...]:
        """Return one boolean per level: does that level (and, for the last one, the middle) use attention."""
        n, att = len(self.channels), self.attention
        if len(att) == n and all(isinstance(a, bool) for a in att):
            return att
        if all(isinstance(a, int) and not isinstance(a, bool) and -n <= a < n for a in att):
            return tuple(i in att or i - n in att for i in range(n))
        raise ValueError(f"UNetConfig: attention must be {n} booleans (one per level) or level indices in "
                         f"{-n}..{n - 1} (negative counts from the lowest resolution), got {list(att)}")


class EmbResBlock(nn.Module):
    """Pre-activation ResBlock, x + conv(SiLU((1 + scale) * GN(conv(SiLU(GN(x)))) + shift)), then attention
    (and, with `context_dim`, cross-attention to a token sequence, as Stable Diffusion's U-Net).

    (scale, shift) = Linear(emb): the embedding modulates the normalised features ("AdaGN", FiLM).
    The last conv starts at zero, so a fresh block is its (1x1) shortcut.
    Returns: (B, nf, H, W) in the dtype autocast gives convs (float32 without autocast).
    """

    def __init__(self, ni: int, nf: int, emb_dim: int, norm_groups: int, dropout: float = 0.0,
                 attention: bool = False, head_dim: int = 32, context_dim: int = 0):
        super().__init__()
        self.cross = (CrossAttention2d(nf, context_dim, head_dim=head_dim, norm_groups=norm_groups)
                      if attention and context_dim else None)
        self.norm1, self.conv1 = group_norm(ni, norm_groups), nn.Conv2d(ni, nf, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * nf)
        self.norm2, self.drop = group_norm(nf, norm_groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(ni, nf, 1) if ni != nf else nn.Identity()
        self.attn = SelfAttention2d(nf, head_dim, norm_groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, ni, H, W); emb: (B, emb_dim), already through SiLU (shared by all blocks); context
        (B, T, context_dim) with context_mask (B, T) (True = a real token) for cross-attention."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, nf, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, nf, 1, 1) each
        h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))
        h = self.conv2(self.drop(h))
        h = self.attn(h + self.skip(x))
        return h if self.cross is None else self.cross(h, context, context_mask)


def _downsample(ch: int, kind: str) -> nn.Module:
    if kind == "avgpool":
        return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(ch, ch, 3, padding=1))
    conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
    nn.init.orthogonal_(conv.weight)  # the course's init for downsamplers: keeps the signal's scale
    return conv


class UNet(nn.Module):
    """Denoising U-Net: x (B, C, H, W), noise_level (B,) float, label (B,) long | None -> (B, C_out, H, W).

    x is what the objective feeds (canonical images are in [-1, 1], noisy ones wider); H and W must
    be divisible by 2^(levels - 1). `label` holds classes 0..n_classes-1, or n_classes for "no
    label"; None means unconditional (the null label when n_classes > 0). The output is unbounded
    (whatever the objective trains it to predict) and exactly zero at initialisation.
    """

    def __init__(self, cfg: UNetConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig(**kwargs)
        ch, g, attention = cfg.channels, cfg.norm_groups, cfg.attention_levels()
        emb_dim = cfg.emb_dim or 4 * ch[0]
        self.noise_emb = NoiseEmbedding(emb_dim, n_freq=ch[0], scale=cfg.noise_level_scale)
        self.label_emb = nn.Embedding(cfg.n_classes + 1, emb_dim) if cfg.n_classes else None
        self.pooled_proj = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        block = dict(emb_dim=emb_dim, norm_groups=g, dropout=cfg.dropout, head_dim=cfg.head_dim,
                     context_dim=cfg.context_dim)

        self.stem = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch[0], 3, padding=1)
        self.down, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        ni = ch[0]
        for i, (nf, nb, att) in enumerate(zip(ch, cfg.blocks, attention, strict=True)):
            self.down.append(nn.ModuleList(EmbResBlock(ni if j == 0 else nf, nf, attention=att, **block)
                                           for j in range(nb)))
            ni = nf
            if i < len(ch) - 1:
                self.downsamplers.append(_downsample(nf, cfg.downsample))
        if cfg.mid_type == "transformer":
            if cfg.mid_size < 1:
                raise ValueError("UNet: a transformer middle needs mid_size, the side of the lowest-resolution map "
                                 "(image_size / 2^(levels - 1)); the diffusion recipe sets it from the data")
            self.mid = TransformerMid(ch[-1], cfg.mid_size, cfg.mid_blocks, emb_dim, cfg.head_dim)
        else:
            self.mid = nn.ModuleList(EmbResBlock(ch[-1], ch[-1], attention=attention[-1], **block)
                                     for _ in range(cfg.mid_blocks))
        self.up, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(ch))):  # self.up[0] is the lowest resolution; inputs are concat(h, skip)
            self.up.append(nn.ModuleList(EmbResBlock(2 * ch[i], ch[i], attention=attention[i], **block)
                                         for _ in range(cfg.blocks[i])))
            if i > 0:  # after 2x nearest upsampling; narrows to the next level so concat(h, skip) is 2 * ch
                self.upsamplers.append(nn.Conv2d(ch[i], ch[i - 1], 3, padding=1))
        self.out_norm = group_norm(ch[0], g)
        self.out_conv = nn.Conv2d(ch[0], cfg.out_channels or cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def embed(self, noise_level: torch.Tensor, label: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Noise embedding + label embedding (null label if `label` is None) + the projected pooled text
        vector (when the model takes one): (B, emb_dim), unbounded."""
        emb = self.noise_emb(noise_level)
        if self.pooled_proj is not None:
            if pooled is None:
                raise ValueError("UNet: this model reads a pooled text vector; pass pooled= (the text encoder's)")
            emb = emb + self.pooled_proj(pooled.to(emb.dtype))
        if self.label_emb is not None:
            if label is None:
                label = torch.full_like(noise_level, self.cfg.n_classes, dtype=torch.long)
            emb = emb + self.label_emb(label)
        elif label is not None:
            raise ValueError("UNet: got a label but the model is unconditional; build it with n_classes > 0")
        return emb

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, label: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, image_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Return (B, out_channels, H, W), unbounded, float32 (bf16 under autocast); zero at init.

        A text-conditional model (context_dim > 0) takes the token states `context` (B, T, D) with
        `context_mask` (B, T) and, with pooled_dim > 0, the pooled vector `pooled` (B, P). An image-conditional
        one (cond_channels > 0) takes `image_cond` (B, cond_channels, H, W), e.g. the low-resolution image
        upscaled (super-resolution), concatenated to x before the stem.
        """
        if self.cfg.context_dim and context is None:
            raise ValueError("UNet: this model attends to text; pass context= (token states) and context_mask=")
        if self.cfg.cond_channels:
            want = (len(x), self.cfg.cond_channels, *x.shape[-2:])
            if image_cond is None or tuple(image_cond.shape) != want:
                got = "none" if image_cond is None else tuple(image_cond.shape)
                raise ValueError(f"UNet: this model is conditioned on an image; pass image_cond= of shape {want}, "
                                 f"got {got}")
            x = torch.cat([x, image_cond.to(x.dtype)], dim=1)
        elif image_cond is not None:
            raise ValueError("UNet: this model takes no image_cond (cond_channels = 0)")
        factor = self.cfg.size_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"UNet: image size {tuple(x.shape[-2:])} must be divisible by {factor} "
                             f"({len(self.cfg.channels)} levels); pad the images or use fewer levels")
        noise_level = torch.as_tensor(noise_level, device=x.device)
        if noise_level.ndim == 0:
            noise_level = noise_level.expand(len(x))
        emb = F.silu(self.embed(noise_level, label, pooled))  # every block's Linear sees SiLU(emb)
        text = {"context": context, "context_mask": context_mask} if self.cfg.context_dim else {}
        h = self.stem(match_memory_format(x, self))  # (B, ch[0], H, W), in the model's memory format
        skips = []
        for i, level in enumerate(self.down):
            for blk in level:
                h = blk(h, emb, **text)
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        if isinstance(self.mid, TransformerMid):
            h = self.mid(h, emb)
        else:
            for blk in self.mid:
                h = blk(h, emb, **text)
        for i, level in enumerate(self.up):
            for blk in level:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb, **text)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))


def drop_labels(labels: torch.Tensor, p: float, n_classes: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label `n_classes` with probability p (classifier-free guidance).

    Returns: a new long tensor shaped like labels, values in 0..n_classes; `labels` is not modified.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"drop_labels: p must be a probability in [0, 1], got {p}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, n_classes), labels)

"""Super-resolution networks (lesson 23): the course's progression as one configurable model.

The task: a 64x64 image is downscaled to 32x32 (bicubic, antialiased) and upscaled back (bicubic);
the network gets that blurry 64x64 image and returns the original (`degrade` makes the pair). So a
network works at the output resolution and only has to add the missing detail. `SuperResConfig`
chooses the step of the progression:

    plain autoencoder     skips=false residual=false   down to 8x8, back up: everything must pass the bottleneck
    U-Net                 skips=true  residual=true    each level's features are added back on the way up, and
                                                       output = input + f(input) with f's last conv zero: at
                                                       initialisation the network returns the bicubic input
    cross convs           cross=true                   a ResBlock + 3x3 conv on each skip before it is added
    back-projection       project=true                 output = input + f - resample(f): the added detail loses
                                                       what survives the downscale, so a flat input stays flat
    pretrained encoder    (recipe: encoder=CLASSIFIER) the down path *is* a classifier's ResNet body
    linear base           base="linear"                output = L(input) + f: L a learned x2 filter bank
                                                       (`LinearUpsampler`, fitted by least squares before
                                                       training) instead of the bicubic input itself

Shape walk for channels (32, 64, 128, 256), blocks (1, 1, 1), a 3x64x64 input:

    encoder (a ResNet body, nn/resnet.py)
      stem   5x5 conv 3->32, BN, ReLU                  (B, 32, 64, 64)    skip 0
      stage  ResBlock 32->64, stride 2                 (B, 64, 32, 32)    skip 1
             ResBlock 64->128, stride 2                (B, 128, 16, 16)   skip 2
             ResBlock 128->256, stride 2               (B, 256, 8, 8)
    decoder  2x nearest, ResBlock 256->128 (+ skip 2)  (B, 128, 16, 16)
             2x nearest, ResBlock 128->64  (+ skip 1)  (B, 64, 32, 32)
             2x nearest, ResBlock 64->32   (+ skip 0)  (B, 32, 64, 64)
    head     ResBlock 32->32, 3x3 conv 32->3           (B, 3, 64, 64)     (+ the input, when residual)

Every norm is a BatchNorm, which in eval mode is a per-pixel affine map: an image cut into overlapping
tiles gives the same pixels as the whole image away from the tile edges (pipelines/superres.py tiles
large images). Sides must be multiples of `size_factor` (2^stages).

Why a linear base: the antialiased downscale and the bicubic upscale together attenuate the frequencies the
32x32 image still holds, not only remove those above its Nyquist limit. The best linear x2 filter for the
training crops (one 16x16 filter per output phase, a least-squares fit: `fit_linear_upsampler`) undoes much of
that and beats bicubic by about 1 dB on the held-out photo crops before any training (docs/superres.md);
the network then adds only what a linear filter cannot.

`FeatureMaps` is the perceptual loss's feature network: a classifier body's activation maps at some
depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_number
from ..errors import CheckpointError
from .init import init_kaiming
from .layers import ResBlock, match_memory_format
from .resnet import ACTIVATIONS, ResNet, ResNetConfig

__all__ = ["SuperResConfig", "SuperResNet", "FeatureMaps", "LinearUpsampler", "fit_linear_upsampler", "stage_ends",
           "downscale", "upscale_bicubic", "degrade", "encoder_config_of"]

SR_BASES = ("bicubic", "linear")


def downscale(x: torch.Tensor, scale: int = 2, clamp: bool = True) -> torch.Tensor:
    """Return images [N, C, H, W] in [-1, 1] shrunk `scale` times (bicubic, antialiased), clamped to [-1, 1] unless
    `clamp` is False (for residuals): [N, C, H // scale, W // scale]."""
    h, w = x.shape[-2] // scale, x.shape[-1] // scale
    y = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp(-1, 1) if clamp else y


def upscale_bicubic(x: torch.Tensor, scale: int = 2, clamp: bool = True) -> torch.Tensor:
    """Return images [N, C, h, w] in [-1, 1] enlarged `scale` times (bicubic), clamped unless `clamp` is False:
    [N, C, h*scale, w*scale]. The baseline every model is compared with, and what the networks here are fed."""
    h, w = x.shape[-2] * scale, x.shape[-1] * scale
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return y.clamp(-1, 1) if clamp else y


def degrade(x: torch.Tensor, scale: int = 2, clamp: bool = True) -> torch.Tensor:
    """Return the network input for targets x [N, C, H, W] in [-1, 1]: downscaled `scale` times, then
    upscaled back to H x W (H, W multiples of scale). Same shape and range as x; with clamp=False any range
    (the part of a residual that survives the downscale)."""
    return upscale_bicubic(downscale(x, scale, clamp), scale, clamp)


def stage_ends(cfg: ResNetConfig) -> list[int]:
    """Return where each resolution of a ResNet body ends: indices into `ResNet(cfg).body` after the stem (full
    resolution) and after each stride-2 stage (the last one includes a pre-activation net's final norm + act)."""
    end = (1 if cfg.dropout2d else 0) + 1 + cfg.stem_blocks
    ends = [end]
    for nb in cfg.blocks:
        end += nb
        ends.append(end)
    ends[-1] += 2 if cfg.preact else 0
    return ends


def encoder_config_of(classifier: ResNetConfig) -> dict:
    """Return the SuperResConfig fields that make a network's down path the body of `classifier`."""
    if classifier.crop:
        raise CheckpointError(f"a classifier that crops its input (crop={classifier.crop}) cannot be a "
                              "super-resolution encoder, which must see every pixel; train one with crop=0")
    return dict(in_channels=classifier.in_channels, channels=classifier.channels, blocks=classifier.blocks,
                stem_blocks=classifier.stem_blocks, act=classifier.act, preact=classifier.preact)


@dataclass
class SuperResConfig:
    """Architecture of `SuperResNet`: a ResNet-body encoder (the fields a ResNetConfig has), the decoder, and
    which step of the course's progression it is (`skips`, `cross`, `residual`)."""

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128, 256)  # stem width, then one stride-2 stage per further entry
    blocks: tuple[int, ...] = (1, 1, 1)  # encoder ResBlocks per stage
    stem_blocks: int = 0  # encoder ResBlocks at full resolution after the stem conv
    act: str = "relu"
    preact: bool = False
    up_blocks: int = 1  # decoder ResBlocks per level (the first one narrows the channels)
    skips: bool = True  # False: the plain autoencoder (no skip connections)
    cross: bool = False  # a ResBlock + 3x3 conv on each skip connection ("cross convs")
    residual: bool = True  # output = input + f(input), f's last conv zero-initialised (identity at init)
    project: bool = False  # with residual: add f - resample(f), only what the downscale removed (back-projection)
    scale: int = 2  # the upscaling factor the network was trained for (its input is bicubic-upscaled by it)
    base: str = "bicubic"  # what the residual is added to: the bicubic input, or "linear" (`LinearUpsampler`)
    base_taps: int = 8  # linear base: its filters span this many low-resolution pixels a side

    def __post_init__(self):
        self.channels, self.blocks = tuple(self.channels), tuple(self.blocks)
        if len(self.channels) < 2 or len(self.blocks) != len(self.channels) - 1:
            raise ValueError(f"SuperResConfig: channels needs a stem width and at least one stage, and blocks one "
                             f"count per stage; got channels {list(self.channels)} and blocks {list(self.blocks)}")
        for c in self.channels:
            check_number("channels (each entry)", c, lo=1, hi=4096, integer=True)
        for b in self.blocks:
            check_number("blocks (each entry)", b, lo=1, hi=64, integer=True)
        check_number("in_channels", self.in_channels, lo=1, hi=64, integer=True)
        check_number("stem_blocks", self.stem_blocks, lo=0, hi=64, integer=True)
        check_number("up_blocks", self.up_blocks, lo=1, hi=64, integer=True)
        check_number("scale", self.scale, lo=2, hi=8, integer=True)
        check_choice("act", self.act, sorted(ACTIVATIONS))
        if self.cross and not self.skips:
            raise ValueError("SuperResConfig: cross convs sit on the skip connections; set skips=true or cross=false")
        check_choice("base", self.base, SR_BASES)
        check_number("base_taps", self.base_taps, lo=1, hi=32, integer=True)
        if self.base == "linear" and not self.residual:
            raise ValueError("SuperResConfig: base=\"linear\" is what the residual is added to; set residual=true "
                             "or base=\"bicubic\"")
        if self.project and not self.residual:
            raise ValueError("SuperResConfig: project=true projects the residual f of output = input + f; set "
                             "residual=true or project=false")

    @property
    def size_factor(self) -> int:
        """Image sides (at the network's, i.e. the output, resolution) must be multiples of this."""
        return 2 ** len(self.blocks)

    def encoder_config(self) -> ResNetConfig:
        """Return the ResNetConfig whose body is this network's down path (a classifier's, for a pretrained one)."""
        return ResNetConfig(in_channels=self.in_channels, n_classes=1, channels=self.channels, blocks=self.blocks,
                            stem_blocks=self.stem_blocks, act=self.act, preact=self.preact, dropout=0.0)


class LinearUpsampler(nn.Module):
    """A learned linear x`scale` filter bank on bicubic-upscaled images: [B, C, H, W] -> [B, C, H, W], float32.

    Each output pixel of a `scale` x `scale` block (its phase) is a weighted sum of the `scale * taps` square of
    input pixels around the block (the same filters for every channel; replicate padding at the borders), so a
    filter sees `taps` low-resolution pixels a side. Initialised to the identity (returns its input);
    `fit_linear_upsampler` sets the least-squares filters, which are a buffer (saved with the weights, never
    changed by the optimizer: Adam's steps of the learning rate's size would move an exact optimum). Always runs
    in float32, also under autocast: its output is the image itself, where bf16's 3 digits would cap the PSNR
    near 50 dB.
    """

    def __init__(self, scale: int = 2, taps: int = 8):
        super().__init__()
        check_number("scale", scale, lo=2, hi=8, integer=True)
        check_number("taps", taps, lo=1, hi=32, integer=True)
        self.scale, self.kernel = scale, scale * taps
        self.pad = scale * (taps - 1) // 2
        self.register_buffer("weight", torch.zeros(scale * scale, 1, self.kernel, self.kernel))  # fitted, not trained
        for a in range(scale):
            for b in range(scale):
                self.weight[a * scale + b, 0, self.pad + a, self.pad + b] = 1.0

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> [B * C, 1, H + kernel - s, W + kernel - s], each channel alone, edges repeated."""
        n, c, h, w = x.shape
        return F.pad(x.reshape(n * c, 1, h, w), (self.pad, self.kernel - self.scale - self.pad) * 2, mode="replicate")

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Return the filter inputs of images [B, C, H, W]: [B * C * (H/s) * (W/s), kernel^2], in x's dtype."""
        return F.unfold(self._padded(x), self.kernel, stride=self.scale).transpose(1, 2).reshape(-1, self.kernel ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"LinearUpsampler: image size {(h, w)} must be divisible by {self.scale}")
        with torch.autocast(x.device.type, enabled=False):
            y = F.pixel_shuffle(F.conv2d(self._padded(x.float()), self.weight.float(), stride=self.scale), self.scale)
        return y.reshape(n, c, h, w)


def _phases(y: torch.Tensor, scale: int) -> torch.Tensor:
    """Targets [B, C, H, W] -> [B * C * (H/s) * (W/s), s^2]: each s x s block's pixels, in `patches` order."""
    n, c, h, w = y.shape
    return F.pixel_unshuffle(y.reshape(n * c, 1, h, w), scale).flatten(2).transpose(1, 2).reshape(-1, scale * scale)


@torch.no_grad()
def fit_linear_upsampler(up: LinearUpsampler, inputs: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, batch_size: int = 64, ridge: float = 1e-6) -> float:
    """Set `up`'s filters to the (weighted) least-squares fit from `inputs` (bicubic-upscaled images [N, C, H, W] in
    [-1, 1]) to `targets` (the originals, same shape); `weights` (N,) >= 0 weigh each image's squared error (e.g. 1 /
    its bicubic MSE, what a mean of per-image PSNRs asks for). Solved in float64 over batches of `batch_size`
    images, with `ridge` (relative to the mean diagonal) for stability. Returns the fit's weighted MSE on
    `inputs`."""
    if inputs.shape != targets.shape or inputs.ndim != 4:
        raise ValueError(f"fit_linear_upsampler: inputs and targets must be [N, C, H, W] of one shape, got "
                         f"{list(inputs.shape)} and {list(targets.shape)}")
    w = torch.ones(len(inputs), dtype=torch.float64) if weights is None else weights.double().flatten()
    if len(w) != len(inputs) or bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError("fit_linear_upsampler: weights must be one non-negative number per image, not all zero")
    k2, s2 = up.kernel ** 2, up.scale ** 2
    gram, cross, tt, rows = (torch.zeros(k2, k2, dtype=torch.float64), torch.zeros(k2, s2, dtype=torch.float64),
                             torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    per = inputs.shape[1] * (inputs.shape[2] // up.scale) * (inputs.shape[3] // up.scale)  # rows per image
    for i in range(0, len(inputs), batch_size):
        p = up.patches(inputs[i: i + batch_size].double())
        t = _phases(targets[i: i + batch_size].double(), up.scale)
        wr = w[i: i + batch_size].repeat_interleave(per)[:, None]
        gram += p.T @ (p * wr)
        cross += p.T @ (t * wr)
        tt += (t * t * wr).sum()
        rows += wr.sum() * s2
    eye = torch.eye(k2, dtype=torch.float64) * (ridge * gram.diagonal().mean())
    sol = torch.linalg.solve(gram + eye, cross)  # (k2, s2)
    up.weight.copy_(sol.T.reshape(s2, 1, up.kernel, up.kernel).to(up.weight.dtype))
    sse = tt - 2 * (sol * cross).sum() + (sol * (gram @ sol)).sum()
    return float(sse / rows)


class SuperResNet(nn.Module):
    """Super-resolution network: bicubic-upscaled images [B, C, H, W] in [-1, 1] -> [B, C, H, W] (unbounded, about
    [-1, 1]). H and W must be multiples of `cfg.size_factor`. With `cfg.residual` it returns exactly its input at
    initialisation; with `cfg.project` and the bicubic base, a constant image (away from the borders) whatever
    its weights.

    `encoder` is a ResNet body (state-dict compatible with a classifier's `body`: `load_encoder` copies one in).
    """

    def __init__(self, cfg: SuperResConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or SuperResConfig(**kwargs)
        act, norm, ch = ACTIVATIONS[cfg.act], nn.BatchNorm2d, cfg.channels
        enc_cfg = cfg.encoder_config()
        self.encoder = ResNet(enc_cfg).body  # (its classifier head is dropped)
        self.ends = stage_ends(enc_cfg)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch) - 1)):  # self.up[0] leaves the lowest resolution
            blocks = [nn.Upsample(scale_factor=2.0, mode="nearest"), ResBlock(ch[i + 1], ch[i], act=act, norm=norm)]
            blocks += [ResBlock(ch[i], ch[i], act=act, norm=norm) for _ in range(cfg.up_blocks - 1)]
            self.up.append(nn.Sequential(*blocks))
        self.cross = (nn.ModuleList(nn.Sequential(ResBlock(c, c, act=act, norm=norm), nn.Conv2d(c, c, 3, padding=1))
                                    for c in ch[:-1]) if cfg.cross else None)
        self.head = nn.Sequential(ResBlock(ch[0], ch[0], act=act, norm=norm), nn.Conv2d(ch[0], cfg.in_channels, 3,
                                                                                        padding=1))
        init_kaiming(self.up)
        init_kaiming(self.head)
        if self.cross is not None:
            init_kaiming(self.cross)
        if cfg.residual:  # f(x) = 0 at init, so the network starts as the bicubic upscaling it is given
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        self.base = LinearUpsampler(cfg.scale, cfg.base_taps) if cfg.base == "linear" else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the encoder's maps at each resolution: [(B, ch[0], H, W), (B, ch[1], H/2, W/2), ...]."""
        feats, h = [], x
        for j, layer in enumerate(self.encoder):
            h = layer(h)
            if j + 1 in self.ends:
                feats.append(h)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cfg.size_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"SuperResNet: image size {tuple(x.shape[-2:])} must be divisible by {f}; pad it "
                             "(pipelines/superres.py does)")
        x = match_memory_format(x, self)
        feats = self.encode(x)
        h = feats[-1]
        for k, up in enumerate(self.up):
            h = up(h)
            if self.cfg.skips:
                i = len(self.up) - 1 - k  # the resolution h is now at
                h = h + (self.cross[i](feats[i]) if self.cross is not None else feats[i])
        out = self.head(h)
        if self.cfg.project:  # keep only the detail the downscale removed: a constant or smooth f adds nothing
            out = out - degrade(out, self.cfg.scale, clamp=False)
        if not self.cfg.residual:
            return out
        return (x if self.base is None else self.base(x)) + out

    def load_encoder(self, classifier_state: dict[str, torch.Tensor], what: str = "the classifier") -> None:
        """Copy a ResNet classifier's `body.*` weights (its state dict) into the encoder; CheckpointError on a
        mismatch (build this network with `encoder_config_of(classifier.cfg)`)."""
        from ..artifacts import load_state

        body = {k[len("body."):]: v for k, v in classifier_state.items() if k.startswith("body.")}
        load_state(self.encoder, body, f"{what} (as a super-resolution encoder)")


class FeatureMaps(nn.Module):
    """A frozen classifier body up to `stages` stride-2 stages (0: all): images [B, C, H, W] in [-1, 1] ->
    activation maps [B, C', H / 2^k, W / 2^k], float32. Always in eval mode (BatchNorm running statistics)."""

    def __init__(self, resnet: ResNet, stages: int = 0):
        super().__init__()
        ends = stage_ends(resnet.cfg)
        check_number("perceptual_stages", stages, lo=0, hi=len(ends) - 1, integer=True)
        self.body = resnet.body[: ends[stages or len(ends) - 1]]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureMaps:
        """Stay in eval mode whatever `mode` is: the features must not depend on the batch."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(match_memory_format(x, self.body)).float()

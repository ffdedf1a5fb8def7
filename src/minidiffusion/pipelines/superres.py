"""A trained upscaler at inference: double the resolution of any image, tiled when it is large.

`Upscaler.from_run(dir)` loads a run of the `superres` recipe (a `SuperResNet`, kind "superres", or the
conditional diffusion model of `photos-sr-diffusion`, kind "superres-diffusion": a U-Net that denoises the
residual x - bicubic(low) given bicubic(low) as an extra input image, sampled by our samplers; see
`DiffusionSRConfig`);
`from_pretrained(NAME)` loads `assets/NAME.safetensors` + `NAME.toml`. `upscale(image, model)` takes a PIL
image or a float tensor [C, H, W] (or [N, C, H, W]) in [-1, 1] and returns the same kind, `model.scale`
times larger:

1. bicubic upscaling (what the network was trained to improve), then
2. the network (one forward pass),
3. for images larger than `tile` (low-resolution pixels): overlapping tiles, each blended in with a weight
   that is 0 over the quarter of the overlap next to a tile's inner edge (where zero padding disturbs the
   network) and ramps linearly to 1 over the next half, so the weights of neighbouring tiles sum to 1.
   Tiles start at multiples of what the network's strides need, so the tiled output equals the untiled
   one away from the image borders when the overlap's quarter exceeds the network's receptive radius
   (BatchNorm in eval mode is per-pixel; a test checks it).

Grayscale images (and grayscale PIL modes) are replicated to the model's 3 channels, upscaled, and the three
output channels averaged back into one (not a Y-channel model: the networks are trained on RGB). An alpha
channel is upscaled bicubically. Inference only: nothing here imports the Learner or the recipes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import component_kind, config_from_file, load_state, read_component, save_component
from ..config import check_number
from ..data.images import check_range, float_to_uint8, uint8_to_float
from ..device import check_precision, with_autocast
from ..diffusion.config import ObjectiveConfig, build_objective
from ..diffusion.samplers import get_sampler
from ..errors import CheckpointError, ConfigError, DataError
from ..nn.superres import SuperResConfig, SuperResNet, upscale_bicubic
from ..nn.unet import UNet, UNetConfig
from ..paths import atomic_write, check_writable, float32_state
from .image import check_sampling

__all__ = ["KIND", "DIFFUSION_KIND", "DiffusionSRConfig", "Upscaler", "upscale", "upscale_file",
           "save_upscaler", "shipped_upscalers", "TILE", "OVERLAP", "evaluate_upscaler", "heldout_images",
           "evaluate_upscaler_on", "luma", "pooled_psnr"]

KIND = "superres"
DIFFUSION_KIND = "superres-diffusion"
TILE, OVERLAP = 192, 32  # default tile side and overlap, in input (low-resolution) pixels
_BATCH = 8  # tiles per network call


def _sr_unet() -> UNetConfig:
    return UNetConfig(in_channels=3, cond_channels=3, channels=(64, 128, 128), blocks=(1, 1, 1),
                      attention=(False, False, False), mid_blocks=1, noise_level_scale=250.0)


@dataclass
class DiffusionSRConfig(ObjectiveConfig):
    """Super-resolution as conditional diffusion (SR3-style, on the residual): the U-Net (`model`, with
    cond_channels = its in_channels) denoises r = x - bicubic(low) given bicubic(low) as `image_cond`; the
    upscaled image is bicubic(low) + the sampled r. No attention by default, so it tiles like a convolution.
    `sigma_data` is the residual's standard deviation (small: bicubic is already close), and training sigmas
    are centred lower (`p_mean`) to match; `sampler`/`steps`/`seed` are how it upscales."""

    model: UNetConfig = field(default_factory=_sr_unet)
    scale: int = 2
    sigma_data: float = 0.065  # the std of x - bicubic(low) on the photo crops (measured: 0.064)
    p_mean: float = -2.5  # training sigmas around the residual's scale (median 0.08)
    sigma_max: float = 10.0
    sampler: str = "dpmpp_2m"
    steps: int = 10
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.objective != "edm":
            raise ConfigError("diffusion super-resolution trains with the EDM objective; drop objective=")
        check_number("scale", self.scale, lo=2, hi=8, integer=True)
        if self.model.cond_channels != self.model.in_channels:
            raise ConfigError(f"the super-resolution U-Net takes the upscaled image as its condition: set "
                              f"model.cond_channels = model.in_channels ({self.model.in_channels})")
        check_sampling(self.sampler, self.steps, seed=self.seed)

    @property
    def in_channels(self) -> int:
        """The image channels (3 for RGB)."""
        return self.model.in_channels

    @property
    def size_factor(self) -> int:
        """Image sides the U-Net takes are multiples of this (2 ^ (levels - 1))."""
        return self.model.size_factor


def _config_class(kind: str | None):
    if kind == KIND:
        return SuperResConfig
    if kind == DIFFUSION_KIND:
        return DiffusionSRConfig
    raise CheckpointError(f"this file holds a {kind or 'model of unknown kind'}, not an upscaler; give a run of "
                          "`minidiffusion train photos-sr2` (or another super-resolution preset)")


def save_upscaler(net: torch.nn.Module, cfg: SuperResConfig | DiffusionSRConfig, path: str | Path) -> Path:
    """Write an upscaler's weights (float32) as `path` (.safetensors) + its config (.toml); return the weights path."""
    return save_component(path, float32_state(net), cfg, DIFFUSION_KIND if isinstance(cfg, DiffusionSRConfig)
                          else KIND)


def build_upscaler_net(cfg: SuperResConfig | DiffusionSRConfig) -> torch.nn.Module:
    """Return the untrained network a config describes: a SuperResNet, or the conditional U-Net."""
    return UNet(cfg.model) if isinstance(cfg, DiffusionSRConfig) else SuperResNet(cfg)


def shipped_upscalers() -> list[str]:
    """Return the names of the upscalers shipped in assets/ (for --pretrained)."""
    return sorted(p.name[: -len(".safetensors")] for p in resources.files("minidiffusion.assets").iterdir()
                  if p.name.endswith(".safetensors") and component_kind(p) in (KIND, DIFFUSION_KIND))


class Upscaler:
    """A trained super-resolution network: `upscale_batch(low)` for aligned batches, `__call__` for any image."""

    def __init__(self, net: torch.nn.Module, cfg: SuperResConfig | DiffusionSRConfig,
                 device: torch.device | str = "cpu", precision: str = "fp32"):
        self.net, self.cfg, self.device = net.eval().to(device), cfg, torch.device(device)
        self.precision = check_precision(precision)
        self.diffusion = isinstance(cfg, DiffusionSRConfig)
        self.objective = build_objective(cfg.objective_config()) if self.diffusion else None

    @property
    def scale(self) -> int:
        """The upscaling factor (2: each side doubles)."""
        return self.cfg.scale

    @property
    def channels(self) -> int:
        """The channels the network works on (3 for RGB models)."""
        return self.cfg.in_channels

    @property
    def align(self) -> int:
        """Input (low-resolution) sides must be multiples of this for the network's strides."""
        return self.cfg.size_factor // math.gcd(self.cfg.size_factor, self.scale)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, weights: str | Path, config: str | Path | None = None, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> Upscaler:
        """Load an upscaler's weights (.safetensors) and config (.toml, default: beside them)."""
        comp = read_component(weights, config=config)
        cfg = config_from_file(_config_class(comp.kind), comp.config, comp.config_path)
        net = build_upscaler_net(cfg)
        load_state(net, comp.tensors, f"{comp.weights} (with its config {comp.config_path})")
        return cls(net, cfg, device, precision)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | str = "cpu", precision: str = "fp32") -> Upscaler:
        """Load `run_dir/model.safetensors`, written at the end of a super-resolution training run."""
        run_dir = Path(run_dir)
        if not (run_dir / "model.safetensors").is_file():
            what = "does not exist" if not run_dir.exists() else "holds no model.safetensors"
            raise CheckpointError(f"{run_dir} {what}: give the --out folder of `minidiffusion train photos-sr2` "
                                  "(or let an interrupted run finish with --resume), or --pretrained NAME")
        return cls.from_file(run_dir / "model.safetensors", device=device, precision=precision)

    @classmethod
    def from_pretrained(cls, name: str = "photos-sr2", device: torch.device | str = "cpu",
                        precision: str = "fp32") -> Upscaler:
        """Load an upscaler shipped with the package (assets/NAME.safetensors)."""
        shipped = shipped_upscalers()
        if name not in shipped:
            raise ConfigError(f"no pretrained upscaler {name!r} (shipped: {', '.join(shipped) or 'none'}); train one "
                              "with `minidiffusion train photos-sr2 --out DIR` and pass --run DIR")
        res = resources.files("minidiffusion.assets") / f"{name}.safetensors"
        with resources.as_file(res) as path:
            return cls.from_file(path, device=device, precision=precision)

    # -- the network on aligned batches --------------------------------------------------------
    def bicubic(self, low: torch.Tensor) -> torch.Tensor:
        """Return the baseline for low-resolution images [N, C, h, w] in [-1, 1]: bicubic upscaling by `scale`,
        [N, C, scale*h, scale*w] in [-1, 1] (exactly what the network is fed)."""
        return upscale_bicubic(low.float(), self.scale)

    def check_sampling(self, steps: int | None = None, seed: int | None = None) -> None:
        """Refuse `steps`/`seed` for an upscaler that does not sample, and out-of-range values for one that does."""
        if not self.diffusion and (steps is not None or seed is not None):
            raise ConfigError("steps and seed are for a diffusion upscaler (photos-sr-diffusion); this one is a "
                              "single forward pass: drop them")
        check_sampling(steps=steps, seed=seed)

    @torch.no_grad()
    def upscale_batch(self, low: torch.Tensor, steps: int | None = None, seed: int | None = None,
                      callback=None) -> torch.Tensor:
        """Return low-resolution images [N, C, h, w] in [-1, 1] (h, w multiples of `align`) upscaled:
        [N, C, scale*h, scale*w] in [-1, 1], on the CPU. A diffusion upscaler samples in `steps` (default its
        config's) from noise seeded by `seed` (default its config's) and calls `callback(info)` after each step
        with the sampler's report plus `image`: the predicted upscaled images so far (bicubic + denoised)."""
        self.check_sampling(steps, seed)
        up = upscale_bicubic(low.to(self.device, torch.float32), self.scale)
        if self.diffusion:
            report = None if callback is None else (
                lambda info: callback({**info, "image": (up + info["denoised"]).clamp(-1, 1)}))
            return self.sample_residual(up, steps, seed, report).add(up).clamp(-1, 1).cpu()
        out = with_autocast(self.net, self.device, self.precision)(up)
        return out.float().clamp(-1, 1).cpu()

    def sample_residual(self, up: torch.Tensor, steps: int | None = None, seed: int | None = None,
                        callback=None) -> torch.Tensor:
        """Return the residual [N, C, H, W] a diffusion upscaler samples for bicubic-upscaled images `up` (same
        shape, [-1, 1]), with its sampler in `steps` (default its config's) from noise seeded by `seed`."""
        cfg = self.cfg
        sigmas = self.objective.sampling_sigmas(steps or cfg.steps, cfg.sampler)
        gen = torch.Generator(self.device).manual_seed(cfg.seed if seed is None else seed)
        x = torch.randn(up.shape, generator=gen, device=self.device) * float(sigmas[0])
        base = with_autocast(self.objective.denoiser(self.net), self.device, self.precision)
        return get_sampler(cfg.sampler)(lambda z, sigma: base(z, sigma, image_cond=up), x, sigmas, generator=gen,
                                        callback=callback).float()

    def __call__(self, image, tile: int = TILE, overlap: int = OVERLAP):
        """Return `upscale(image, self, tile, overlap)`: the same kind of image, `scale` times larger."""
        return upscale(image, self, tile=tile, overlap=overlap)


# -- tiling --------------------------------------------------------------------------------------
def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _layout(n: int, tile: int, overlap: int, align: int) -> tuple[list[int], int, int]:
    """Return (tile starts, padded length, tile length) along one axis of n low-resolution pixels."""
    if tile == 0 or n <= tile:
        size = _round_up(n, align)
        return [0], size, size
    stride = tile - overlap
    k = -(-(n - tile) // stride)
    return [i * stride for i in range(k + 1)], tile + k * stride, tile


def _ramp(length: int, inner_start: bool, inner_end: bool, overlap: int) -> torch.Tensor:
    """Blending weights (length,) of one tile along one axis, in output pixels: 1 inside, 0 over the first quarter of
    the overlap at an inner edge, a linear ramp over the next half (neighbours' weights sum to 1)."""
    margin = overlap // 4
    ramp = overlap - 2 * margin
    d = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if inner_start:
        w = torch.minimum(w, ((d - margin + 0.5) / ramp).clamp(0, 1))
    if inner_end:
        w = torch.minimum(w, ((length - 1 - d - margin + 0.5) / ramp).clamp(0, 1))
    return w


def _tiles(ys: list[int], xs: list[int]) -> Iterator[tuple[int, int]]:
    for y in ys:
        for x in xs:
            yield y, x


def _upscale_image(x: torch.Tensor, model: Upscaler, tile: int, overlap: int, **sampling) -> torch.Tensor:
    """One image [C, H, W] (C = the model's channels) -> [C, sH, sW], tiled when larger than `tile`; `sampling`
    (steps, seed, callback) goes to `model.upscale_batch`."""
    c, h, w = x.shape
    s, a = model.scale, model.align
    tile = _round_up(tile, a) if tile else 0
    overlap = _round_up(overlap, a) if tile else 0
    if tile and (overlap < 4 or overlap >= tile):
        raise ConfigError(f"the tile overlap must be at least 4 pixels and less than the tile ({tile}), got "
                          f"{overlap} (both are rounded up to multiples of {a})")
    ys, hp, th = _layout(h, tile, overlap, a)
    xs, wp, tw = _layout(w, tile, overlap, a)
    xp = F.pad(x[None], (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x[None]
    out, wsum = torch.zeros(c, s * hp, s * wp), torch.zeros(1, s * hp, s * wp)
    places = list(_tiles(ys, xs))
    for i in range(0, len(places), _BATCH):
        chunk = places[i: i + _BATCH]
        low = torch.cat([xp[..., y: y + th, x0: x0 + tw] for y, x0 in chunk])
        high = model.upscale_batch(low, **sampling)
        for (y, x0), img in zip(chunk, high, strict=True):
            wy = _ramp(s * th, y > 0, y + th < hp, s * overlap)
            wx = _ramp(s * tw, x0 > 0, x0 + tw < wp, s * overlap)
            weight = wy[:, None] * wx[None, :]
            out[:, s * y: s * (y + th), s * x0: s * (x0 + tw)] += img * weight
            wsum[:, s * y: s * (y + th), s * x0: s * (x0 + tw)] += weight
    return (out / wsum)[:, : s * h, : s * w].clamp(-1, 1)


def _upscale_tensor(x: torch.Tensor, model: Upscaler, **kw) -> torch.Tensor:
    """[C, H, W] in [-1, 1] with C = 1 or the model's channels (or C = 3 for a 1-channel model) -> [C, sH, sW]."""
    c, k = x.shape[0], model.channels
    if c == k:
        return _upscale_image(x, model, **kw)
    if c == 1:  # grayscale: replicate to the model's channels, average the result back
        return _upscale_image(x.expand(k, -1, -1), model, **kw).mean(0, keepdim=True)
    if k == 1:  # a grayscale model: each channel on its own
        return torch.cat([_upscale_image(ch[None], model, **kw) for ch in x])
    raise DataError(f"cannot upscale a {c}-channel image with a {k}-channel model; give an RGB or grayscale image")


def upscale(image, model: Upscaler, tile: int = TILE, overlap: int = OVERLAP, steps: int | None = None,
            seed: int | None = None, callback=None):
    """Return `image` upscaled `model.scale` times: a PIL image (any mode; L and LA stay grayscale, alpha is
    upscaled bicubically) or a float tensor [C, H, W] / [N, C, H, W] in [-1, 1] (C = 1 or 3), returned as the same
    kind: [C, sH, sW] in [-1, 1]. Images larger than `tile` low-resolution pixels are processed in tiles that
    overlap by `overlap` pixels (`tile=0`: never tile). A diffusion upscaler samples each batch of tiles in `steps`
    from noise seeded by `seed` (defaults: its config's) and reports each step to `callback` (`upscale_batch`)."""
    check_number("tile", tile, lo=0, hi=1 << 16, integer=True)
    check_number("overlap", overlap, lo=0, hi=1 << 16, integer=True)
    model.check_sampling(steps, seed)
    kw = dict(model=model, tile=tile, overlap=overlap)
    kw.update({k: v for k, v in (("steps", steps), ("seed", seed), ("callback", callback)) if v is not None})
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            raise DataError("upscale takes float images in [-1, 1]; convert uint8 pixels with "
                            "minidiffusion.data.images.uint8_to_float")
        if image.ndim == 4:
            return torch.stack([upscale(im, **kw) for im in image])
        if image.ndim != 3 or image.shape[0] not in (1, 3) or min(image.shape[1:]) < 1:
            raise DataError(f"upscale takes an image [C, H, W] (C = 1 or 3) or a batch [N, C, H, W], got "
                            f"{list(image.shape)}")
        check_range(image, "upscale", allow_unusual=True)
        return _upscale_tensor(image.detach().float().cpu(), **kw)
    return _upscale_pil(image, **kw)


def _upscale_pil(img, **kw):
    from PIL import Image

    mode = img.mode
    alpha = img.getchannel("A") if mode in ("RGBA", "LA") else None
    base = img.convert("L" if mode in ("L", "LA", "1", "I", "I;16", "F") else "RGB")
    arr = torch.from_numpy(np.array(base))
    x = uint8_to_float(arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1))
    y = float_to_uint8(_upscale_tensor(x, **kw)).numpy()
    out = Image.fromarray(y[0], mode="L") if y.shape[0] == 1 else Image.fromarray(y.transpose(1, 2, 0), mode="RGB")
    if alpha is not None:
        a = uint8_to_float(torch.from_numpy(np.array(alpha)))[None, None]
        a_up = float_to_uint8(upscale_bicubic(a, kw["model"].scale))[0, 0].numpy()
        out.putalpha(Image.fromarray(a_up, mode="L"))
    return out


def upscale_file(image: str | Path, out: str | Path, pretrained: str | None = None, run: str | Path | None = None,
                 device: torch.device | str = "cpu", tile: int = TILE, overlap: int = OVERLAP,
                 precision: str = "fp32", steps: int | None = None, seed: int | None = None) -> dict:
    """Upscale the image file `image` with a shipped (`pretrained`) or trained (`run`) upscaler into `out` (.png,
    .jpg or .webp); return {out, model, input_size, output_size, mode, seconds}. `out` is checked
    for writability before any work; `steps`/`seed` are a diffusion upscaler's (refused for the others)."""
    from PIL import Image, UnidentifiedImageError

    if (pretrained is None) == (run is None):
        raise ConfigError("give one upscaler: --pretrained NAME (e.g. photos-sr2) or --run DIR")
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"--out must end in .png, .jpg or .webp, got {out}")
    check_writable(out)
    model = Upscaler.from_pretrained(pretrained, device, precision) if pretrained else Upscaler.from_run(
        run, device, precision)
    try:
        with Image.open(image) as src:
            src.load()
            img = src.copy()
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"no image file at {image}; give the path of a PNG or JPEG") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read {image} as an image ({e}); give a PNG or JPEG file") from None
    start = time.time()
    result = upscale(img, model, tile=tile, overlap=overlap, steps=steps, seed=seed)
    seconds = time.time() - start
    if out.suffix.lower() in (".jpg", ".jpeg") and result.mode not in ("RGB", "L"):
        result = result.convert("RGB")
    with atomic_write(out) as tmp:
        result.save(tmp, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(out.suffix.lower(), "PNG"))
    return {"out": str(out), "model": str(run) if run else f"pretrained:{pretrained}",
            "input_size": list(img.size), "output_size": list(result.size), "mode": img.mode,
            "seconds": round(seconds, 2)}


# -- evaluation ----------------------------------------------------------------------------------
PROTOCOL = ("x{scale}: held-out {size}x{size} crops downscaled (bicubic, antialiased) to {low}x{low}; the network "
            "and bicubic upscaling scored on the same crops; PSNR/SSIM on RGB in [-1, 1] (range 2), whole image; "
            "psnr_y: the luma channel (ITU-R 601, range 0..255), {scale} border pixels cropped; psnr_pooled: the "
            "PSNR of the mean squared error over all crops (psnr is the mean of per-crop PSNRs); sharpness: mean "
            "squared Laplacian relative to the original's (1 = as much fine detail)")


def luma(x: torch.Tensor) -> torch.Tensor:
    """Return the ITU-R BT.601 luma of RGB images [N, 3, H, W] in [-1, 1] as [N, 1, H, W] in [-1, 1]
    (Y = 16 + 65.481 R + 128.553 G + 24.966 B on 0..1 RGB, rescaled from 16..235 to [-1, 1])."""
    rgb = (x.double() + 1) / 2
    y = (65.481 * rgb[:, 0:1] + 128.553 * rgb[:, 1:2] + 24.966 * rgb[:, 2:3]) / 219  # (Y - 16) / 219: 0..1
    return (y * 2 - 1).clamp(-1, 1)


@torch.no_grad()
def evaluate_upscaler(model: Upscaler, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Return PSNR (dB) and SSIM of `model` and of bicubic upscaling on the same images: originals [N, C, S, S]
    in [-1, 1] (S a multiple of model.scale * model.align), downscaled by model.scale and upscaled back by each.

    Keys: n, psnr, psnr_bicubic, psnr_gain (network - bicubic), ssim, ssim_bicubic, psnr_y, psnr_y_bicubic
    (luma, border of `scale` pixels cropped), psnr_pooled, psnr_pooled_bicubic (`pooled_psnr`), sharpness,
    sharpness_bicubic (`metrics.image_quality.sharpness`: fine detail relative to the original's, 1 = as much)
    and protocol (a sentence saying all this).
    """
    from ..metrics.image_quality import mean_finite, psnr, sharpness, ssim
    from ..nn.superres import downscale

    check_range(images, "evaluate_upscaler", allow_unusual=True)
    s, size = model.scale, images.shape[-1]
    if size % (s * model.align) or images.shape[-2] % (s * model.align):
        raise DataError(f"evaluate_upscaler: image sides must be multiples of {s * model.align}, got "
                        f"{list(images.shape[-2:])}")
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("psnr", "psnr_bicubic", "ssim", "ssim_bicubic",
                                                            "psnr_y", "psnr_y_bicubic", "sharpness",
                                                            "sharpness_bicubic")}
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].float()
        low = downscale(x, s)
        for name, y in (("", model.upscale_batch(low)), ("_bicubic", model.bicubic(low))):
            rows[f"psnr{name}"].append(psnr(y, x))
            rows[f"ssim{name}"].append(ssim(y, x))
            rows[f"sharpness{name}"].append(sharpness(y, x))
            if x.shape[1] == 3:
                crop = (..., slice(s, -s), slice(s, -s))
                rows[f"psnr_y{name}"].append(psnr(luma(y)[crop], luma(x)[crop]))
    out = {"n": len(images)}
    for k, v in rows.items():
        out[k] = round(mean_finite(torch.cat(v)), 4) if v else None
    out["psnr_gain"] = round(out["psnr"] - out["psnr_bicubic"], 4)
    for name in ("", "_bicubic"):  # one PSNR of all the squared error: flat crops (50 dB and up) weigh little
        out[f"psnr_pooled{name}"] = round(pooled_psnr(torch.cat(rows[f"psnr{name}"])), 4)
    out["protocol"] = PROTOCOL.format(scale=s, size=size, low=size // s)
    return out


def pooled_psnr(psnrs: torch.Tensor) -> float:
    """Return the PSNR (dB) of the mean squared error behind per-image PSNRs `psnrs` (N,) of equal-sized images
    in [-1, 1]: the error of the whole set, where the mean of PSNRs is dominated by the images that are nearly
    exact."""
    from ..metrics.image_quality import DATA_RANGE

    mse = (DATA_RANGE**2 / 10 ** (psnrs.double() / 10)).mean()
    return float(10 * torch.log10(DATA_RANGE**2 / mse))


def heldout_images(data: str = "photos", n: int = 512, image_size: int = 64) -> torch.Tensor:
    """Return the first `n` held-out images of `data` (photos: the 1,024 test crops a default run validates on,
    from held-out photos, seed 0; sprites; emoji) as float32 [n, 3, S, S] in [-1, 1]."""
    if data == "sprites":
        from ..data.sprites import load_sprites

        x = load_sprites("test", image_size=image_size).images
    elif data in ("photos", "emoji"):
        from ..data.sets import load_image_set

        x = load_image_set(data, "test", image_size=image_size, label=None, n_crops=4096, seed=0).images
    else:
        raise ConfigError(f"no held-out images for {data!r}; use photos, sprites or emoji")
    return uint8_to_float(x[:n])


def evaluate_upscaler_on(model: Upscaler, data: str = "photos", n: int = 512, image_size: int = 64) -> dict:
    """Return `evaluate_upscaler` on `heldout_images(data, n, image_size)`, plus data and seconds."""
    start = time.time()
    result = evaluate_upscaler(model, heldout_images(data, n, image_size))
    return {**result, "data": data, "seconds": round(time.time() - start, 1)}

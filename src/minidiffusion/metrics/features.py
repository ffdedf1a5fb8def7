"""The feature network for FID/KID: our Fashion-MNIST classifier's penultimate layer, guarded.

A feature extractor is any `nn.Module` that maps a batch of images [N, C, H, W] to features
[N, D]. The shipped one is `ClassifierFeatures` around the project's ResNet classifier
(`assets/classifier.safetensors` + `classifier.toml`, loaded by `load_feature_network`), whose
`features()` are the D = 256 pooled activations before the last linear layer.

The pixel range is a contract. The course once fed reals in [-0.5, 0.5] to a feature network
trained on [-1, 1]: both sides gave low-contrast features and the FIDs came out falsely low.
So `ClassifierFeatures` refuses batches that are clearly not float32 [N, 1, 32, 32] in [-1, 1]
(uint8 pixels, [0, 1] or [-0.5, 0.5] images) with a sentence naming the likely mistake, unless
`allow_unusual=True` says the data really is like that.

`reference_stats` computes the statistics of a reference set (by default the Fashion-MNIST test
set) once and caches them in `$XDG_CACHE_HOME/minidiffusion/fid/` (default ~/.cache), keyed by
a hash of the network's weights, the images and the set's name: a second call costs no forward
pass, and a different network or data set never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import TypeAlias

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..artifacts import PICKLE_SUFFIXES, config_from_file, load_state, read_component, refuse_pickle
from ..data.images import check_range
from ..errors import CheckpointError, DataError, OutputError
from ..nn.resnet import ResNet, ResNetConfig
from ..paths import cache_dir
from .fid import FeatureStats

__all__ = ["FeatureExtractor", "ClassifierFeatures", "extract_features", "reference_stats",
           "load_feature_network", "classifier_config", "default_stats_dir"]

FeatureExtractor: TypeAlias = nn.Module
"""Any module mapping images [N, C, H, W] (float, in the range it was trained on) to features [N, D]."""

_PROGRESS_MIN = 5000  # show a progress bar from this many images on (and only on a terminal)
_KEY_VERSION = b"minidiffusion-fid-cache-1"  # bump when feature extraction changes
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ClassifierFeatures(nn.Module):
    """Feature extractor: images float32 [N, C, S, S] in [-1, 1] -> `model.features(images)` [N, D].

    Wraps a classifier with a `.features()` method (our `ResNet`; C is its `cfg.in_channels`, 1 for
    Fashion-MNIST) and keeps it in eval mode for good (BatchNorm running statistics, no dropout):
    features must never depend on which images share a batch. Every call checks the input contract
    first; `allow_unusual=True` skips the range-spread check for data that really is low-contrast.
    """

    def __init__(self, model: nn.Module, allow_unusual: bool = False, image_size: int | None = None):
        super().__init__()
        if not callable(getattr(model, "features", None)):
            raise TypeError(f"ClassifierFeatures needs a model with a .features(x) method (like ResNet), got "
                            f"{type(model).__name__}; for other networks write an nn.Module returning [N, D]")
        self.model = model
        self.allow_unusual = allow_unusual
        cfg = getattr(model, "cfg", None)
        image_size = image_size or getattr(cfg, "image_size", 32)  # a ResNet knows the size it was trained at
        self.image_shape = (getattr(cfg, "in_channels", 1), image_size, image_size)
        self.eval()

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Stay in eval mode whatever `mode` is (a feature network is never trained through this wrapper)."""
        return super().train(False)

    def check_input(self, images: Tensor) -> None:
        """Raise ValueError (naming the mistake) unless images are float32 [N, C, 32, 32] in [-1, 1]."""
        c, h, w = self.image_shape
        if not isinstance(images, Tensor):
            raise ValueError(f"feature network: expected a float32 tensor [N, {c}, {h}, {w}], "
                             f"got {type(images).__name__}")
        if images.dtype == torch.uint8:
            raise ValueError("feature network: got uint8 pixels (0..255); convert them with "
                             "minidiffusion.data.images.uint8_to_float, which gives the float32 [-1, 1] "
                             "range the network was trained on")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            hint = (" (28x28 Fashion-MNIST images are padded to 32x32 with pad_to(x, 32), background -1)"
                    if tuple(images.shape[-2:]) == (28, 28) else "")
            raise ValueError(f"feature network: expected images [N, {c}, {h}, {w}], got "
                             f"{list(images.shape)}{hint}; images that are not {c}x{h}x{w} need your own "
                             "feature extractor: any nn.Module returning features [N, D] works with "
                             "extract_features and reference_stats")
        if images.dtype != torch.float32:
            raise ValueError(f"feature network: expected float32 images in [-1, 1], got {images.dtype}; "
                             "convert floats with images.float() (uint8 pixels with uint8_to_float)")
        check_range(images, "feature network", allow_unusual=self.allow_unusual)

    def forward(self, images: Tensor) -> Tensor:
        """Return the features [N, D] (float32) of images float32 [N, C, 32, 32] in [-1, 1]."""
        self.check_input(images)
        return self.model.features(images)


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 500,
                     device: str | torch.device | None = None) -> Tensor:
    """Return the features [N, D] (float64, on the CPU) of images [N, C, H, W] in [-1, 1].

    Runs `extractor` in eval mode (its mode is restored afterwards) and without gradients, in
    batches of `batch_size` on `device` (None: where the extractor's weights are; otherwise the
    extractor is moved there). A progress bar appears for large N when stderr is a terminal.
    """
    if not isinstance(images, Tensor) or images.ndim < 1 or len(images) == 0:
        raise ValueError("extract_features needs a non-empty tensor of images [N, C, H, W]")
    if batch_size < 1:
        raise ValueError(f"extract_features needs batch_size >= 1, got {batch_size}")
    if device is None:
        device = _module_device(extractor)
    else:
        device = torch.device(device)
        extractor.to(device)
    n, was_training = len(images), extractor.training
    extractor.eval()
    out = []
    try:
        with tqdm(total=n, desc="features", unit="img", disable=None if n >= _PROGRESS_MIN else True) as bar:
            for i in range(0, n, batch_size):
                xb = images[i: i + batch_size].to(device)
                feats = extractor(xb)
                if not isinstance(feats, Tensor) or feats.ndim != 2 or len(feats) != len(xb):
                    shape = list(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                    raise ValueError(f"the feature extractor must return features [N, D] = [{len(xb)}, D] "
                                     f"for {len(xb)} images, got {shape}")
                out.append(feats.detach().to("cpu", torch.float64))
                bar.update(len(xb))
    finally:
        extractor.train(was_training)
    return torch.cat(out)


def default_stats_dir() -> Path:
    """Return the reference stats cache folder `$XDG_CACHE_HOME/minidiffusion/fid` (default ~/.cache)."""
    return cache_dir("fid")


def _hash_tensor(h: hashlib._Hash, name: str, t: Tensor) -> None:
    """Feed a tensor's name, dtype, shape and raw bytes (logical order, any memory format) into `h`."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _cache_key(extractor: FeatureExtractor, images: Tensor, name: str) -> str:
    """Return a SHA-256 hex key of (extractor class + state_dict tensors, images, name, N)."""
    h = hashlib.sha256(_KEY_VERSION)
    h.update(f"|{type(extractor).__module__}.{type(extractor).__qualname__}|{name}|{len(images)}|".encode())
    for k, v in extractor.state_dict().items():
        _hash_tensor(h, k, v)
    _hash_tensor(h, "images", images)
    return h.hexdigest()


def reference_stats(extractor: FeatureExtractor, images: Tensor, cache_dir: str | Path | None = None,
                    name: str = "fmnist-test", batch_size: int = 500,
                    device: str | torch.device | None = None) -> FeatureStats:
    """Return the FeatureStats (mu [D], sigma [D, D], n, features [N, D], all float64) of reference images.

    The result is cached as `<cache_dir>/<name>-n<N>-<key>.safetensors` (default dir:
    `default_stats_dir()`), where the key hashes the extractor's class and weights, the images
    and `name`; a second call with the same network and images reads the file and runs no
    forward pass. The features are kept because KID needs them. A damaged cache file is
    recomputed; a cache folder that cannot be written only costs a warning.
    """
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"reference_stats: name {name!r} must be letters, digits, '.', '_' or '-' "
                         "(it names a file)")
    key = _cache_key(extractor, images, name)
    folder = Path(cache_dir) if cache_dir is not None else default_stats_dir()
    path = folder / f"{name}-n{len(images)}-{key[:16]}.safetensors"
    if path.is_file():
        try:
            stats = FeatureStats.load(path)
        except DataError as e:
            warnings.warn(f"recomputing reference stats: {e}", stacklevel=2)
        else:
            if stats.key == key and stats.features is not None:
                return stats
    stats = FeatureStats.from_features(extract_features(extractor, images, batch_size, device), key=key)
    try:
        stats.save(path)
    except (OSError, OutputError) as e:
        warnings.warn(f"could not cache reference stats in {path} ({e}); they will be computed again "
                      "next time", stacklevel=2)
    return stats


def _network_files(path: str | Path | None) -> tuple[Path, Path]:
    """Return (weights .safetensors, config .toml) for `load_feature_network`'s `path` argument."""
    if path is None:
        assets = Path(str(resources.files("minidiffusion.assets")))
        return assets / "classifier.safetensors", assets / "classifier.toml"
    path = Path(path)
    if path.is_dir():  # the shipped pair's names, or a classifier run (model.toml; config.toml before 0.2)
        pairs = [("classifier.safetensors", "classifier.toml"), ("model.safetensors", "model.toml"),
                 ("model.safetensors", "config.toml")]
        weights, config = next(((w, c) for w, c in pairs if (path / w).is_file() and (path / c).is_file()), pairs[1])
        return path / weights, path / config
    sibling, run_config = path.with_suffix(".toml"), path.parent / "config.toml"
    return path, run_config if run_config.is_file() and not sibling.is_file() else sibling


def classifier_config(d: dict, path: str | Path) -> ResNetConfig:
    """Return the ResNetConfig in a classifier's TOML: the file itself, or its [model] table when it is a
    whole training config (classifier.toml and run config.toml files written before components had kinds)."""
    if isinstance(d.get("model"), dict):
        d = d["model"]
    return config_from_file(ResNetConfig, d, path)


def load_feature_network(path: str | Path | None = None, allow_unusual: bool = False) -> ClassifierFeatures:
    """Return the FID/KID feature network: a trained classifier wrapped in `ClassifierFeatures` (CPU, eval).

    `path` is a classifier's .safetensors weights with its TOML beside it (same name with .toml, or
    the run's config.toml), or a folder holding classifier.safetensors + classifier.toml or a classifier
    run (model.safetensors + model.toml). None loads the shipped network from `minidiffusion/assets/`.
    Missing, unsafe (pickle) or mismatched files raise CheckpointError. The global torch RNG is left
    untouched. Needs no training code.
    """
    weights, config = _network_files(path)
    if weights.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(weights)
    if not weights.is_file():
        if path is None:
            raise CheckpointError(f"the shipped FID feature network {weights} is missing from this "
                                  "installation; train a classifier with `minidiffusion train fmnist-classifier "
                                  "--out DIR` and pass DIR as the feature network path")
        raise CheckpointError(f"no feature network weights at {weights}; pass a classifier's .safetensors "
                              "file or the run directory written by `minidiffusion train fmnist-classifier`")
    if not config.is_file():
        raise CheckpointError(f"the feature network {weights} has no config at {config}; keep its "
                              "TOML (as the training run wrote it, model.toml) next to the weights")
    comp = read_component(weights, kind="classifier", config=config)
    cfg = classifier_config(comp.config, config)
    with torch.random.fork_rng(devices=[]):  # building the network draws random initial weights
        model = ResNet(cfg)
    load_state(model, comp.tensors, f"feature network {weights}")
    return ClassifierFeatures(model.float().eval(), allow_unusual=allow_unusual)

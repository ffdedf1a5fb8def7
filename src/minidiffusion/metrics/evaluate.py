"""Scoring samples against a reference set: FID and KID (and the reals floor) in a feature network's space.

The reference set is the held-out split of the data a model was trained on (Fashion-MNIST, the
emoji, the instrument spectrograms), in the features of the classifier shipped for it
(`FEATURE_NETWORKS`); any model with a `sample(n, ...)` method and any feature network
([N, C, H, W] -> [N, D]) can be scored the same way. Where that classifier was trained on the very
labels a conditional model draws (`LABELLED_FEATURES`), the score also says how often it
recognises each requested class in the samples.

All images are in the canonical [-1, 1] range; the feature network's input guard refuses
anything else (the course's worst bug was an FID computed on images in the wrong range).
Every number comes with its floor: `fid_reals`, the same metric for N *real* training
images against the same reference, which is what a perfect model would score at this N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import check_number
from ..data.images import uint8_to_float
from ..errors import CheckpointError
from .features import ClassifierFeatures, _module_device, extract_features, load_feature_network, reference_stats
from .fid import fid_from_features, kid_from_features
from .image_quality import psnr, ssim

__all__ = ["score_features", "reference_features", "reals_floor", "evaluate_samples", "evaluate_model", "real_images",
           "default_feature_network", "evaluate_reconstructions", "class_accuracy", "MIN_EVAL_SAMPLES",
           "FEATURE_NETWORKS", "LABELLED_FEATURES"]

MIN_EVAL_SAMPLES = 2  # KID's unbiased estimate and a covariance both need two feature vectors
FEATURE_NETWORKS = {"fashion-mnist": "classifier", "emoji": "emoji-classifier",  # shipped in assets/
                    "instruments": "instruments-classifier"}
# the sets whose feature network classifies the labels their conditional models draw (instruments-classifier: the
# ten families), so `evaluate_model` also reports how often each requested class is recognised in the samples
LABELLED_FEATURES = frozenset({"instruments"})
_REFERENCE_NAMES = {"fashion-mnist": "fmnist-test", "emoji": "emoji-test", "instruments": "instruments-test"}


def real_images(split: str = "train", n: int | None = None, seed: int = 0, data: str = "fashion-mnist"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (images float32 [n, C, S, S] in [-1, 1], labels [n] or None) of a data set's split, drawn without
    replacement (seeded); all of the split when n is None. `data`: fashion-mnist, emoji (64x64), photos or
    instruments (spectrograms, 1x128x128)."""
    if data == "fashion-mnist":
        from ..data.fashion_mnist import load_fashion_mnist

        x, y = load_fashion_mnist(split)
    else:
        from ..data.sets import load_image_set

        s = load_image_set(data, split, image_size=64, label="group" if data == "emoji" else None)
        x, y = s.images, s.labels
    if n is not None and n < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[idx], (y[idx] if y is not None else None)
    return uint8_to_float(x), y


def default_feature_network(data: str = "fashion-mnist", allow_unusual: bool = False) -> ClassifierFeatures:
    """Return the feature network shipped for a data set (assets/NAME.safetensors); CheckpointError if none is."""
    from importlib import resources

    name = FEATURE_NETWORKS.get(data)
    if name is None:
        raise CheckpointError(f"no feature network is shipped for {data!r}; pass --features with a classifier run "
                              "trained on images like these")
    path = Path(str(resources.files("minidiffusion.assets"))) / f"{name}.safetensors"
    if data != "fashion-mnist" and not path.is_file():
        raise CheckpointError(f"the {data} feature network ({path.name}) is not in this installation; train one with "
                              f"`minidiffusion train {data}-classifier --out DIR` and pass --features DIR")
    return load_feature_network(None if data == "fashion-mnist" else path, allow_unusual=allow_unusual)


def score_features(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """Return {'fid', 'kid', 'kid_std'} of feature sets [N, D] (KID subsets of min(1000, N, M))."""
    gen = torch.Generator().manual_seed(seed)
    kid, kid_std = kid_from_features(real, fake, subset_size=min(1000, len(real), len(fake)), generator=gen)
    return {"fid": fid_from_features(real, fake), "kid": kid, "kid_std": kid_std}


def reference_features(net: ClassifierFeatures, data: str = "fashion-mnist") -> torch.Tensor:
    """Return the held-out split's features [N, D] under `net` (cached on disk per feature network)."""
    x_test, _ = real_images("test", data=data)
    return reference_stats(net, x_test, name=_REFERENCE_NAMES.get(data, f"{data}-test")).features


def reals_floor(net: ClassifierFeatures, n: int, seed: int = 0, reference: torch.Tensor | None = None,
                data: str = "fashion-mnist") -> dict:
    """Return {'fid', 'kid', 'kid_std'} of n real training images against the held-out split (a perfect model's)."""
    reference = reference_features(net, data) if reference is None else reference
    reals, _ = real_images("train", n, seed=seed, data=data)
    return score_features(reference, extract_features(net, reals), seed)


def evaluate_samples(samples: torch.Tensor, feature_net: ClassifierFeatures | None = None,
                     with_reals: bool = True, seed: int = 0, reference: torch.Tensor | None = None,
                     data: str = "fashion-mnist") -> dict:
    """Return FID/KID of `samples` ([N, C, S, S] in [-1, 1]) against the held-out split of `data`, and the floor.

    Keys: fid, kid, kid_std, and with `with_reals` fid_reals, kid_reals (N real training images
    scored the same way). The reference statistics are cached per feature network; callers that
    score many sample sets pass `reference=reference_features(net)` to skip reloading and hashing
    the reference images each time.
    """
    net = feature_net or default_feature_network(data)
    reference = reference_features(net, data) if reference is None else reference
    out = score_features(reference, extract_features(net, samples), seed)
    if with_reals:
        floor = reals_floor(net, len(samples), seed, reference, data)
        out.update(fid_reals=floor["fid"], kid_reals=floor["kid"])
    return out


def evaluate_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor,
                             feature_net: ClassifierFeatures | None = None, seed: int = 0) -> dict:
    """Return {psnr, ssim (means over the images), n} and, with a feature network, reconstruction FID/KID
    (reconstructions against the originals). Both image batches [N, C, H, W] in [-1, 1]."""
    out = {"psnr": float(psnr(reconstructions, originals).mean()),
           "ssim": float(ssim(reconstructions, originals).mean()), "n": len(originals)}
    if feature_net is not None:
        real, fake = extract_features(feature_net, originals), extract_features(feature_net, reconstructions)
        out.update({f"r{k}": v for k, v in score_features(real, fake, seed).items()})
    return out


@torch.no_grad()
def class_accuracy(net: ClassifierFeatures, images: torch.Tensor, labels: torch.Tensor,
                   class_names: list[str] | None = None, batch_size: int = 500) -> dict:
    """Return {'accuracy': the fraction (0..1) of `images` ([N, C, H, W] in [-1, 1]) that the feature network's
    classifier assigns their `labels` [N], 'class_accuracy': {class name (or index): that fraction}} for each
    class present in `labels`."""
    preds, device = [], _module_device(net)
    for i in range(0, len(images), batch_size):
        xb = images[i: i + batch_size].to(device)
        net.check_input(xb)
        preds.append(net.model(xb).argmax(dim=1).cpu())
    hit = (torch.cat(preds) == labels.cpu()).float()
    names = class_names or []
    per = {(names[k] if k < len(names) else str(k)): round(float(hit[labels == k].mean()), 4)
           for k in sorted(set(labels.tolist()))}
    return {"accuracy": round(float(hit.mean()), 4), "class_accuracy": per}


def evaluate_model(model, n: int = 2048, sampler: str | None = None, steps: int | None = None,
                   guidance: float | None = None, seed: int = 0,
                   feature_net: ClassifierFeatures | None = None, precision: str = "fp32",
                   schedule: str | None = None, shard: range | None = None,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Sample `n` images from a DiffusionModel (labels balanced over its classes) and score them against the
    held-out split of the data set the model was trained on (`model.cfg.data`).

    `precision` is the network's precision while sampling (see `DiffusionModel.sample`); `n` must be
    at least MIN_EVAL_SAMPLES. Returns the keys of `evaluate_samples` plus n, sampler, steps, guidance,
    nfe, precision and seconds (wall clock of sampling + scoring); for a conditional model of a set in
    LABELLED_FEATURES whose feature network has the model's number of classes, also `class_accuracy`'s keys.

    Split over processes (torchrun; the command line passes learner.distributed's `shard_range(n)` and
    `gather`): this process samples only the images of `shard` (their balanced labels, noise from
    seed + shard.start), `gather` joins every process's images in order, and all n are scored once.
    With one process and no shard the samples are those of `model.sample(n, seed=seed)`.
    """
    check_number("n", n, lo=MIN_EVAL_SAMPLES, hi=60_000, integer=True)
    sampler, steps, guidance = model.settings(sampler, steps, guidance)
    start = time.time()
    data = getattr(model.cfg, "data", "fashion-mnist")
    net = feature_net or default_feature_network(data)  # before sampling: a missing network fails fast
    if shard is None:
        samples, ids = model.sample(n, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                                    precision=precision, schedule=schedule)
    else:
        balanced = model.label_ids(None, n)
        mine = None if balanced is None else balanced[shard.start: shard.stop].tolist()
        samples, ids = model.sample(len(shard), sampler=sampler, steps=steps, guidance=guidance, labels=mine,
                                    seed=seed + shard.start, precision=precision, schedule=schedule)
        samples = gather(samples) if gather is not None else samples
        ids = gather(ids) if gather is not None and ids is not None else ids
    result = evaluate_samples(samples, net, seed=seed, data=data)
    n_classes = getattr(getattr(getattr(net, "model", None), "cfg", None), "n_classes", None)
    if ids is not None and data in LABELLED_FEATURES and n_classes == model.cfg.model.n_classes:
        result.update(class_accuracy(net, samples, ids, model.class_names))
    result.update(n=n, sampler=sampler, steps=steps, guidance=guidance, nfe=model.nfe(sampler, steps),
                  precision=precision, seed=seed, data=data, seconds=round(time.time() - start, 1),
                  **({"schedule": schedule} if schedule else {}))
    return result

"""Scoring samples against a reference set: FID and KID (and the reals floor) in a feature network's space.

Today's reference set is Fashion-MNIST's test set with the shipped classifier's features; any
model with a `sample(n, ...)` method and any feature network ([N, C, H, W] -> [N, D]) can be
scored the same way.

All images are in the canonical [-1, 1] range; the feature network's input guard refuses
anything else (the course's worst bug was an FID computed on images in the wrong range).
Every number comes with its floor: `fid_reals`, the same metric for N *real* training
images against the same reference, which is what a perfect model would score at this N.
"""

from __future__ import annotations

import time

import torch

from ..config import check_number
from ..data.fashion_mnist import load_fashion_mnist
from ..data.images import uint8_to_float
from .features import ClassifierFeatures, extract_features, load_feature_network, reference_stats
from .fid import fid_from_features, kid_from_features

__all__ = ["score_features", "reference_features", "reals_floor", "evaluate_samples", "evaluate_model", "real_images",
           "MIN_EVAL_SAMPLES"]

MIN_EVAL_SAMPLES = 2  # KID's unbiased estimate and a covariance both need two feature vectors


def real_images(split: str = "train", n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images float32 [n, 1, 32, 32] in [-1, 1], labels [n]) drawn without replacement
    (seeded), class-balanced by construction of the random draw; all of the split when n is None."""
    x, y = load_fashion_mnist(split)
    if n is not None and n < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[idx], y[idx]
    return uint8_to_float(x), y


def score_features(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """Return {'fid', 'kid', 'kid_std'} of feature sets [N, D] (KID subsets of min(1000, N, M))."""
    gen = torch.Generator().manual_seed(seed)
    kid, kid_std = kid_from_features(real, fake, subset_size=min(1000, len(real), len(fake)), generator=gen)
    return {"fid": fid_from_features(real, fake), "kid": kid, "kid_std": kid_std}


def reference_features(net: ClassifierFeatures) -> torch.Tensor:
    """Return the test set's features [10000, D] under `net` (cached on disk per feature network)."""
    x_test, _ = real_images("test")
    return reference_stats(net, x_test, name="fmnist-test").features


def reals_floor(net: ClassifierFeatures, n: int, seed: int = 0, reference: torch.Tensor | None = None) -> dict:
    """Return {'fid', 'kid', 'kid_std'} of n real training images against the test set: a perfect model's score."""
    reference = reference_features(net) if reference is None else reference
    reals, _ = real_images("train", n, seed=seed)
    return score_features(reference, extract_features(net, reals), seed)


def evaluate_samples(samples: torch.Tensor, feature_net: ClassifierFeatures | None = None,
                     with_reals: bool = True, seed: int = 0, reference: torch.Tensor | None = None) -> dict:
    """Return FID/KID of `samples` ([N, 1, 32, 32] in [-1, 1]) against the test set, and the floor.

    Keys: fid, kid, kid_std, and with `with_reals` fid_reals, kid_reals (N real training images
    scored the same way). The test-set statistics are cached per feature network; callers that
    score many sample sets pass `reference=reference_features(net)` to skip reloading and hashing
    the test images each time.
    """
    net = feature_net or load_feature_network()
    reference = reference_features(net) if reference is None else reference
    out = score_features(reference, extract_features(net, samples), seed)
    if with_reals:
        floor = reals_floor(net, len(samples), seed, reference)
        out.update(fid_reals=floor["fid"], kid_reals=floor["kid"])
    return out


def evaluate_model(model, n: int = 2048, sampler: str | None = None, steps: int | None = None,
                   guidance: float | None = None, seed: int = 0,
                   feature_net: ClassifierFeatures | None = None, precision: str = "fp32") -> dict:
    """Sample `n` images from a DiffusionModel (labels balanced over its classes) and score them.

    `precision` is the network's precision while sampling (see `DiffusionModel.sample`); `n` must be
    at least MIN_EVAL_SAMPLES. Returns the keys of `evaluate_samples` plus n, sampler, steps, guidance,
    nfe, precision and seconds (wall clock of sampling + scoring).
    """
    check_number("n", n, lo=MIN_EVAL_SAMPLES, hi=60_000, integer=True)
    sampler, steps, guidance = model.settings(sampler, steps, guidance)
    start = time.time()
    samples, _ = model.sample(n, sampler=sampler, steps=steps, guidance=guidance, seed=seed, precision=precision)
    result = evaluate_samples(samples, feature_net, seed=seed)
    result.update(n=n, sampler=sampler, steps=steps, guidance=guidance, nfe=model.nfe(sampler, steps),
                  precision=precision, seed=seed, seconds=round(time.time() - start, 1))
    return result

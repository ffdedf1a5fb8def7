"""FID and KID from feature vectors: the maths only, in float64, no network and no scipy.

FID (Heusel et al. 2017) fits a Gaussian to each feature set and returns the Frechet distance

    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

The usual code computes (S1 S2)^{1/2} with `scipy.linalg.sqrtm` on the non-symmetric product,
which is slow, goes complex, and is inaccurate when a covariance is singular (fewer samples than
feature dimensions). Only the *trace* of that root is needed, and

    tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(S1 S2)) = sum_i sqrt(lambda_i(A S2 A)),   A = S1^{1/2},

because S1 S2 = A (A S2) and A S2 A = (A S2) A have the same eigenvalues (AB and BA always do).
A S2 A is symmetric positive semi-definite, so `torch.linalg.eigh` gives its eigenvalues exactly
(up to rounding), real and >= 0; rounding can push zero eigenvalues slightly negative, which are
clamped to 0 before the square root. Same number as scipy's formula, computed stably.

KID (Binkowski et al. 2018) is the unbiased squared MMD with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; unlike FID it has no bias in the number
of samples, so it can compare small sets. KID needs the features themselves, not just (mu, S).

`FeatureStats` holds (mu, S, n) and optionally the features, saved as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError
from ..paths import save_safetensors

__all__ = ["gaussian_stats", "frechet_distance", "fid_from_features", "kid_from_features", "FeatureStats"]

_STATS_FORMAT = "minidiffusion-feature-stats-1"


def _as_features(x: Tensor, what: str, min_rows: int = 2) -> Tensor:
    """Return `x` as a float64 [N, D] tensor (same device); raise ValueError for other shapes or NaN."""
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected features [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{what}: needs at least {min_rows} feature vectors, got {x.shape[0]}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or inf; check the images and the feature network")
    return x


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Return (mu [D], sigma [D, D]), float64: the mean and unbiased (N-1) covariance of features [N, D]."""
    x = _as_features(features, "gaussian_stats")
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(s: Tensor) -> Tensor:
    """Return the symmetric square root of a symmetric PSD matrix (negative rounding noise clamped to 0)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Return the Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), a float >= 0 (feature units^2).

    Computed in float64 as ||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2});
    see the module docstring for why this equals the usual sqrtm(S1 S2) formula.
    """
    mu1, mu2 = (torch.as_tensor(m).detach().to(torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).detach().to(torch.float64) for s in (sigma1, sigma2))
    d = mu1.numel()
    if mu2.numel() != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {tuple(mu1.shape)}, "
                         f"sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    s2 = s2.to(s1.device)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = eig.clamp(min=0).sqrt().sum()
    diff = mu1 - mu2.to(mu1.device)
    value = float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)  # rounding can give -1e-13 for identical distributions


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Return the FID (a float >= 0, in feature units^2) between features real [N, D] and fake [M, D]."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """Return the cubic polynomial kernel matrix (x.y / d + 1)^3, [len(x), len(y)]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Return the unbiased estimate of MMD^2 between equal-sized samples x, y [m, D] (a 0-d tensor)."""
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off_diagonal = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return off_diagonal - 2 * kxy.sum() / (m * m)


def kid_from_features(real: Tensor, fake: Tensor, subset_size: int = 1000, subsets: int = 100,
                      generator: torch.Generator | None = None) -> tuple[float, float]:
    """Return the KID (mean, std) over `subsets` random subsets, in feature units^6 (cubic kernel).

    Each subset draws min(subset_size, N, M) rows without replacement from real [N, D] and from
    fake [M, D] and computes the unbiased squared MMD with k(x, y) = (x.y / D + 1)^3 in float64.
    The mean is an unbiased estimate of MMD^2 (it can be slightly negative for equal distributions);
    std is the population standard deviation of the subset values (0 for one subset), a measure of
    the spread of the estimate, as in torchmetrics. Subsets are drawn with `generator` (None: the
    global torch RNG), so a seeded generator gives a reproducible result.
    """
    x, y = _as_features(real, "kid_from_features (real)"), _as_features(fake, "kid_from_features (fake)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid_from_features: real has {x.shape[1]} feature dimensions, fake {y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid_from_features needs subsets >= 1 and subset_size >= 2, "
                         f"got subsets={subsets}, subset_size={subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    values = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        ix = torch.randperm(x.shape[0], generator=generator)[:m]
        iy = torch.randperm(y.shape[0], generator=generator)[:m]
        values[i] = _mmd2_unbiased(x[ix.to(x.device)], y[iy.to(y.device)])
    return float(values.mean()), float(values.std(correction=0))


@dataclass
class FeatureStats:
    """Gaussian statistics of one feature set, and optionally the features themselves (for KID).

    mu: [D] float64 mean; sigma: [D, D] float64 unbiased covariance; n: number of feature vectors;
    features: [n, D] float64 or None; key: a string identifying what produced them (network + data),
    used by the reference cache to tell a stale file from a valid one.
    """

    mu: Tensor
    sigma: Tensor
    n: int
    features: Tensor | None = None
    key: str = ""

    @classmethod
    def from_features(cls, features: Tensor, key: str = "", keep_features: bool = True) -> FeatureStats:
        """Return the stats of features [N, D] (float64, CPU), keeping the features unless told not to."""
        x = _as_features(features, "FeatureStats.from_features").cpu()
        mu, sigma = gaussian_stats(x)
        return cls(mu=mu, sigma=sigma, n=x.shape[0], features=x if keep_features else None, key=key)

    def save(self, path: str | Path) -> Path:
        """Write the stats to `path` as safetensors (atomically, see paths.save_safetensors); return the path."""
        tensors = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            tensors["features"] = self.features
        tensors = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in tensors.items()}
        meta = {"format": _STATS_FORMAT, "n": str(self.n), "key": self.key}
        return save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Return the stats written by `save` to `path`; DataError if missing, damaged or not stats."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise DataError(f"refusing to read {path}: feature stats are .safetensors files (pickles such "
                            "as .pt can execute code); save them with FeatureStats.save")
        if not path.is_file():
            raise DataError(f"no feature stats at {path}; compute them with reference_stats "
                            "or FeatureStats.save")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"cannot read {path} as safetensors ({e}); delete it and compute the "
                            "stats again") from e
        if meta.get("format") != _STATS_FORMAT or not {"mu", "sigma"} <= tensors.keys():
            raise DataError(f"{path} is a safetensors file but not minidiffusion feature stats; "
                            "delete it and compute the stats again")
        return cls(mu=tensors["mu"], sigma=tensors["sigma"], n=int(meta["n"]),
                   features=tensors.get("features"), key=meta.get("key", ""))

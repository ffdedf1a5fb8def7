"""FID/KID maths: checked against scipy's sqrtm formula, analytic cases and a direct O(n^2) MMD."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from minidiffusion.errors import DataError
from minidiffusion.metrics.fid import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    kid_from_features,
)


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """The textbook formula (as in pytorch-fid): sqrtm of the non-symmetric product S1 S2."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """n float64 samples of a random anisotropic, correlated Gaussian in d dimensions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift + torch.rand(d, generator=g)


@pytest.mark.parametrize("n,m,d", [(50, 40, 1), (200, 150, 8), (300, 250, 64),  # full-rank covariances
                                   (20, 30, 64), (10, 10, 32)])  # rank-deficient: fewer samples than dims
def test_fid_matches_scipy_sqrtm_formula(n: int, m: int, d: int):
    real, fake = correlated(n, d, seed=d), correlated(m, d, seed=d + 1, shift=0.3)
    expected = scipy_fid(real.numpy(), fake.numpy())
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)


def test_gaussian_stats_match_numpy_mean_and_unbiased_cov():
    x = correlated(40, 5, seed=0)
    mu, sigma = gaussian_stats(x.float())  # float32 in, float64 out
    assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False, ddof=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,d", [(500, 16), (12, 40)])
def test_fid_of_a_set_with_itself_is_zero(n: int, d: int):
    x = correlated(n, d, seed=3)
    assert abs(fid_from_features(x, x)) < 1e-6


def test_fid_of_shifted_means_with_equal_covariances_is_squared_shift():
    x = correlated(300, 10, seed=4)
    delta = torch.linspace(-1, 2, 10, dtype=torch.float64)
    assert fid_from_features(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-9)


def test_fid_in_one_dimension_by_hand():
    # (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s1 = 2, s2 = 3: 4 + 1
    t = torch.tensor
    value = frechet_distance(t([1.0]), t([[4.0]]), t([3.0]), t([[9.0]]))
    assert value == pytest.approx(5.0, rel=1e-12)


def test_fid_of_diagonal_gaussians_is_sum_of_per_axis_distances():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    std1, std2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 0.0])  # one degenerate axis
    expected = float(((mu1 - mu2) ** 2 + (std1 - std2) ** 2).sum())  # 1 + 4  +  0 + 0  +  4 + 0.25
    assert frechet_distance(mu1, torch.diag(std1**2), mu2, torch.diag(std2**2)) == pytest.approx(expected)
    assert expected == pytest.approx(9.25)


def test_fid_is_symmetric_and_rejects_mismatched_shapes():
    a, b = correlated(60, 6, seed=5), correlated(70, 6, seed=6)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        gaussian_stats(torch.zeros(4, 3, 2))


def kid_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out as explicit double sums."""
    m, d = x.shape

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_double_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) * 1.5 + 0.4
    # subset_size >= N: every subset holds all rows (reordered), so every subset gives the full-set value
    mean, std = kid_from_features(x, y, subset_size=100, subsets=4, generator=g)
    assert mean == pytest.approx(kid_numpy(x.numpy(), y.numpy()), rel=1e-10)
    assert std < 1e-12


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted_ones():
    g = torch.Generator().manual_seed(1)
    # two independent samples of one distribution: same mixing matrix and offset, fresh noise
    mix = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4
    x = torch.randn(600, 16, generator=g, dtype=torch.float64) @ mix
    y = torch.randn(600, 16, generator=g, dtype=torch.float64) @ mix
    mean0, std0 = kid_from_features(x, y, subset_size=200, subsets=20, generator=g)
    assert abs(mean0) < 3 * std0 and abs(mean0) < 0.02  # noise level: ~0.005 over seeds
    mean1, std1 = kid_from_features(x, y + 0.5, subset_size=200, subsets=20, generator=g)
    assert mean1 > 0.5 and mean1 > 5 * std1  # ~1.15 over seeds, 50x the noise bound above


def test_kid_is_reproducible_with_a_seeded_generator_and_caps_the_subset_size():
    x, y = correlated(30, 4, seed=8), correlated(12, 4, seed=9)  # subset_size capped at 12
    first = kid_from_features(x, y, subset_size=1000, subsets=5, generator=torch.Generator().manual_seed(3))
    again = kid_from_features(x, y, subset_size=1000, subsets=5, generator=torch.Generator().manual_seed(3))
    assert first == again and first[1] > 0  # different subsets of x: a real spread
    with pytest.raises(ValueError, match="feature dimensions"):
        kid_from_features(x, correlated(12, 5, seed=0))


def test_feature_stats_save_load_round_trip(tmp_path):
    x = correlated(25, 6, seed=10)
    stats = FeatureStats.from_features(x, key="abc123")
    path = stats.save(tmp_path / "sub" / "stats.safetensors")
    back = FeatureStats.load(path)
    assert back.n == 25 and back.key == "abc123"
    for name in ("mu", "sigma", "features"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
        assert getattr(back, name).dtype == torch.float64
    slim_path = FeatureStats.from_features(x, keep_features=False).save(tmp_path / "slim.safetensors")
    slim = FeatureStats.load(slim_path)
    assert slim.features is None and torch.equal(slim.mu, stats.mu)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_feature_stats_load_refuses_pickles_and_damaged_files(tmp_path):
    with pytest.raises(DataError, match="pickle"):
        FeatureStats.load(tmp_path / "stats.pt")
    with pytest.raises(DataError, match="no feature stats"):
        FeatureStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="cannot read"):
        FeatureStats.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not minidiffusion feature stats"):
        FeatureStats.load(tmp_path / "other.safetensors")

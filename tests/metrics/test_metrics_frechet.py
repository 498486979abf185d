"""Fréchet distance against pytorch-fid's sqrtm path; streaming statistics against np.cov."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from latentforge_metrics.stats import GaussianStats, frechet_distance


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """ReLU features of a random linear map: correlated, non-negative, like pool3."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.maximum(rng.standard_normal((n, d)) @ mix + shift, 0)


def _moments(x: np.ndarray):
    return x.mean(0), np.cov(x, rowvar=False)


def _reference(m1, s1, m2, s2) -> float:
    with warnings.catch_warnings():  # sqrtm(disp=False) is deprecated in scipy >= 1.16
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(calculate_frechet_distance(m1, s1, m2, s2))


@pytest.mark.parametrize(("n1", "n2"), [(600, 800), (100, 800), (100, 150)])  # full rank, rank-deficient
def test_equals_pytorch_fid(n1, n2):
    d = 256
    m1, s1 = _moments(_features(n1, d, 0))
    m2, s2 = _moments(_features(n2, d, 1, shift=0.1))
    want = _reference(m1, s1, m2, s2)
    assert abs(frechet_distance(m1, s1, m2, s2) - want) <= 1e-6 * abs(want)
    assert abs(frechet_distance(torch.from_numpy(m2), torch.from_numpy(s2), m1, s1) - want) <= 1e-6 * abs(
        want
    )


@pytest.mark.slow
@pytest.mark.parametrize(("n1", "n2"), [(4000, 5000), (1000, 5000), (1000, 1500)])
def test_equals_pytorch_fid_2048(n1, n2):
    d = 2048
    m1, s1 = _moments(_features(n1, d, 0))
    m2, s2 = _moments(_features(n2, d, 1, shift=0.1))
    want = _reference(m1, s1, m2, s2)
    assert abs(frechet_distance(m1, s1, m2, s2) - want) <= 1e-6 * abs(want)


def test_identical_sets_give_zero_up_to_rounding():
    m, s = _moments(_features(300, 64, 2))
    assert abs(frechet_distance(m, s, m, s)) < 1e-9 * np.trace(s)


def test_streaming_stats_equal_np_cov_and_do_not_depend_on_batching():
    x = _features(300, 48, 3) * 7 + 3  # a large mean makes one-pass formulas lose digits
    y = _features(250, 48, 4)
    ref = GaussianStats()
    ref.update(torch.from_numpy(y))
    fids = []
    for batch in (1, 7, 64):
        stats = GaussianStats()
        for chunk in torch.from_numpy(x).float().split(batch):
            stats.update(chunk)
        assert stats.n == 300
        np.testing.assert_allclose(stats.mu, x.astype(np.float32).mean(0, dtype=np.float64), rtol=1e-12)
        np.testing.assert_allclose(
            stats.sigma, np.cov(x.astype(np.float32), rowvar=False), rtol=1e-9, atol=1e-12
        )
        fids.append(frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma))
    assert max(fids) - min(fids) <= 1e-8 * abs(fids[0])


def test_merge_equals_one_pass():
    x = torch.from_numpy(_features(200, 16, 5))
    whole, a, b, empty = GaussianStats(), GaussianStats(), GaussianStats(), GaussianStats()
    whole.update(x)
    a.update(x[:37])
    b.update(x[37:])
    a.merge(b)
    a.merge(empty)
    assert a.n == 200
    np.testing.assert_allclose(a.mu, whole.mu, rtol=1e-13)
    np.testing.assert_allclose(a.sigma, whole.sigma, rtol=1e-11, atol=1e-14)


def test_fewer_samples_than_dims_warns_with_the_count():
    stats = GaussianStats()
    stats.update(torch.rand(30, 64))
    with pytest.warns(RuntimeWarning, match=r"covariance of 30 samples of 64-d features is singular"):
        _ = stats.sigma
    with pytest.raises(ValueError, match="at least 2 samples"):
        one = GaussianStats()
        one.update(torch.rand(1, 4))
        _ = one.sigma


def test_bad_statistics_are_rejected():
    m, s = _moments(_features(100, 16, 6))
    with pytest.raises(ValueError, match="different dimensions: 16 vs 8"):
        frechet_distance(m, s, m[:8], s[:8, :8])
    with pytest.raises(ValueError, match="mu \\[D\\] and sigma \\[D, D\\]"):
        frechet_distance(m, s[:, :8], m, s)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(m * np.nan, s, m, s)
    indefinite = s - 2 * np.abs(s).max() * np.eye(16)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(m, s, m, indefinite)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(m, indefinite, m, s)
    stats = GaussianStats(16)
    with pytest.raises(ValueError, match="16-d"):
        stats.update(torch.rand(4, 8))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.full((4, 16), float("nan")))
    loaded = GaussianStats.from_moments(m, s)
    with pytest.raises(ValueError, match="without a sample count"):
        loaded.update(torch.rand(4, 16))

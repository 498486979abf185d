"""Fréchet distance of 2048-d statistics: ours (pivoted Cholesky + eigvalsh) vs scipy sqrtm (pytorch-fid)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from latentforge_metrics.stats import frechet_distance


@pytest.fixture(scope="module")
def stats(full):
    d, n = (2048, 6000) if full else (64, 300)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    out = []
    for shift in (0.0, 0.1):
        x = np.maximum(rng.standard_normal((n, d)) @ mix + shift, 0)
        out.append((x.mean(0), np.cov(x, rowvar=False)))
    return out


@pytest.fixture(scope="module")
def reference(stats):
    (m1, s1), (m2, s2) = stats
    with warnings.catch_warnings():  # sqrtm(disp=False) is deprecated in scipy >= 1.16
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(calculate_frechet_distance(m1, s1, m2, s2))


def test_ours(measure, stats, reference):
    (m1, s1), (m2, s2) = stats
    fd = measure(
        lambda: frechet_distance(m1, s1, m2, s2),
        group="metrics: Fréchet distance",
        impl="ours",
        items=1,
        unit="distances/s",
    )
    assert abs(fd - reference) <= 1e-6 * abs(reference)


def test_scipy_sqrtm(measure, stats, reference):
    (m1, s1), (m2, s2) = stats

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(calculate_frechet_distance(m1, s1, m2, s2))

    fd = measure(
        run, group="metrics: Fréchet distance", impl="pytorch-fid (scipy sqrtm)", items=1, unit="distances/s"
    )
    assert fd == pytest.approx(reference, rel=1e-9)

"""KID against torch-fidelity and torchmetrics on identical features, and the metric's own API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric
from torchmetrics.image.kid import poly_mmd

from latentforge_core import registry
from latentforge_core.errors import InputError
from latentforge_core.protocols import Metric
from latentforge_metrics import KID, kernel_inception_distance


def _feats(n, seed, shift=0.0, d=2048):
    """Non-negative rows like pool3 (a ReLU then a mean), float64."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) + shift).relu()


def test_kid_equals_torch_fidelity_on_the_same_subsets():
    fake, real = _feats(300, 0, shift=0.05), _feats(260, 1)
    kw = dict(kid_subsets=12, kid_subset_size=100, rng_seed=2020, verbose=False)
    want = kid_features_to_metric(fake, real, **kw)  # float64 inputs: torch-fidelity's numpy runs in float64
    mean, std = kernel_inception_distance(fake, real, subsets=12, subset_size=100, seed=2020)
    assert mean == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(want["kernel_inception_distance_std"], rel=1e-9)
    assert mean > 0 and std > 0
    # torch-fidelity on the float32 features it gets from its extractor: float32 kernel sums
    f32 = kid_features_to_metric(fake.float(), real.float(), **kw)["kernel_inception_distance_mean"]
    assert mean == pytest.approx(f32, rel=1e-4)  # measured 1.3e-5


def test_kid_of_whole_sets_equals_torchmetrics_poly_mmd():
    """One subset of every row is a permutation of each set: the MMD² of the whole sets."""
    fake, real = _feats(150, 2, shift=0.1), _feats(150, 3)
    mean, std = kernel_inception_distance(fake, real, subsets=1, subset_size=150)
    assert mean == pytest.approx(poly_mmd(real, fake).item(), rel=1e-10)
    assert std == 0.0


def test_kid_metric_streams_merges_and_takes_a_fixed_reference():
    fake, real = _feats(120, 4, shift=0.05).float(), _feats(110, 5).float()
    want = kernel_inception_distance(fake, real, subsets=5, subset_size=100, seed=7)
    streamed, half = KID(subsets=5, subset_size=100, seed=7), KID(subsets=5, subset_size=100, seed=7)
    streamed.update_features(fake[:50])
    half.update_features(fake[50:])
    streamed.merge(half)
    for chunk in real.split(40):
        streamed.update_features(chunk, real=True)
    fixed = KID(real, subsets=5, subset_size=100, seed=7)
    fixed.update_features(fake)
    assert streamed.compute() == fixed.compute() == {"kid": want[0], "kid_std": want[1]}
    with pytest.raises(InputError, match="fixed reference"):
        fixed.update_features(real, real=True)
    streamed.reset()
    with pytest.raises(InputError, match="no features"):
        streamed.compute()


def test_kid_is_registered_and_refuses_too_few_samples():
    kid = registry.metrics.build("kid")
    assert isinstance(kid, KID) and isinstance(kid, Metric)
    assert (kid.subsets, kid.subset_size, kid.seed) == (100, 1000, 2020)  # torch-fidelity's defaults
    kid.update_features(_feats(20, 6))
    kid.update_features(_feats(30, 7), real=True)
    with pytest.raises(InputError, match=r"subset_size=1000 .* got 20 and 30"):
        kid.compute()
    no_reference = KID(subset_size=10)
    no_reference.update_features(_feats(20, 8))
    with pytest.raises(InputError, match="KID has no reference"):
        no_reference.compute()
    with pytest.raises(InputError, match=r"\[N, 2048\]"):
        KID(np.zeros((4, 16)))
    with pytest.raises(InputError, match="subset_size ≥ 2"):
        kernel_inception_distance(_feats(4, 9), _feats(4, 10), subset_size=1)

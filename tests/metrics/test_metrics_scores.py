"""IS, precision/recall, PSNR and SSIM against torch-fidelity and torchmetrics on identical inputs."""

from __future__ import annotations

import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from latentforge_core import registry
from latentforge_core.errors import StateError
from latentforge_core.protocols import Metric
from latentforge_metrics import (
    PSNR,
    SSIM,
    InceptionScore,
    PrecisionRecall,
    inception_score,
    inception_score_adm,
    precision_recall,
    psnr,
    ssim,
)
from latentforge_metrics.generative import _kth_neighbour_sq_radii


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, 1008, generator=gen) * 4  # peaked, diverse predictions: IS well above 1
    return centres[torch.randint(0, 20, (n,), generator=gen)] + torch.randn(n, 1008, generator=gen)


@pytest.mark.parametrize("shuffle", [True, False])
def test_inception_score_equals_torch_fidelity(shuffle):
    logits = _logits(1000)
    want = isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=2020)
    mean, std = inception_score(logits, splits=10, shuffle=shuffle)
    assert want["inception_score_mean"] > 5
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-9)


def test_adm_splits_are_consecutive_blocks_of_5000():
    logits = _logits(10000, seed=1)
    want = isc_features_to_metric(logits, splits=2, shuffle=False)
    mean, std = inception_score_adm(logits)
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-5)  # float32 as TF vs float64
    assert std == pytest.approx(want["inception_score_std"], rel=1e-3, abs=1e-4)


def test_saturated_softmax_gives_the_exact_score_not_nan():
    labels = torch.arange(1000) % 10  # ten classes, predicted with probability exactly 1
    logits = 1000.0 * torch.nn.functional.one_hot(labels, 1008).float()
    assert inception_score_adm(logits, split_size=500)[0] == pytest.approx(10.0, rel=1e-5)
    assert inception_score(logits, shuffle=False)[0] == pytest.approx(10.0, rel=1e-12)


def test_inception_score_metric_merges_and_splits_by_protocol():  # the network is built lazily: not here
    a = InceptionScore()
    b = registry.metrics.build("inception-score", protocol="adm")
    assert isinstance(a, Metric)
    logits = _logits(300, seed=2)
    a.update_features(logits[:100])
    half = InceptionScore()
    half.update_features(logits[100:])
    a.merge(half)
    b.update_features(logits)
    assert a.compute()["inception_score"] == pytest.approx(inception_score(logits)[0], rel=1e-12)
    assert b.compute()["inception_score"] == pytest.approx(inception_score_adm(logits)[0], rel=1e-12)
    a.reset()
    with pytest.raises(ValueError, match="no features"):
        a.compute()
    with pytest.raises(ValueError, match="at least splits=10"):
        inception_score(logits[:5])


def test_precision_recall_equals_torch_fidelity():
    gen = torch.Generator().manual_seed(3)
    real = torch.randn(300, 8, generator=gen)
    fake = 1.2 * torch.randn(400, 8, generator=gen) + 0.5
    p, r = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95
    got = precision_recall(real, fake, k=3, batch_size=64)  # many row and column blocks
    assert got == {
        "precision": pytest.approx(p, abs=1e-6),
        "recall": pytest.approx(r, abs=1e-6),
    }  # same counts


@pytest.mark.parametrize("batch_size", [2, 7, 10000])  # tiles smaller than k+1, uneven, one tile
def test_precision_recall_tiles_equal_torch_fidelity(batch_size):
    gen = torch.Generator().manual_seed(6)
    real = torch.randn(120, 64, generator=gen).relu()
    fake = (1.1 * torch.randn(90, 64, generator=gen) + 0.05).relu()
    fake[:5] = real[:5]  # duplicates: zero distances across the sets
    p, r = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95
    got = precision_recall(real, fake, k=3, batch_size=batch_size)
    # torch-fidelity averages in fp32: equal counts agree to 1e-7, one sample apart is 1/120
    assert got == {"precision": pytest.approx(p, abs=1e-6), "recall": pytest.approx(r, abs=1e-6)}


def test_kth_neighbour_radii_equal_brute_force():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, 32, generator=gen)
    want = torch.cdist(x.double(), x.double()).kthvalue(5, dim=1).values  # self + 4 neighbours
    got = _kth_neighbour_sq_radii(x, 4, tile=33).double().sqrt()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_precision_recall_metric_with_reference_features():
    gen = torch.Generator().manual_seed(4)
    real, fake = torch.randn(200, 2048, generator=gen), torch.randn(150, 2048, generator=gen) + 0.05
    metric = PrecisionRecall(real, batch_size=50)
    metric.update_features(fake[:70])
    other = PrecisionRecall(real)
    other.update_features(fake[70:])
    metric.merge(other)
    assert metric.compute() == precision_recall(real, fake)
    with pytest.raises(ValueError, match="fixed reference"):
        metric.update_features(real[:3], real=True)
    with pytest.raises(ValueError, match=r"\[N, 2048\]"):
        PrecisionRecall(torch.randn(10, 64))
    with pytest.raises(ValueError, match="no reference"):
        PrecisionRecall().compute()


@pytest.fixture(scope="module")
def image_pairs():
    gen = torch.Generator().manual_seed(5)
    target = torch.rand(6, 3, 37, 45, generator=gen)
    preds = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    return preds, target


def test_psnr_equals_torchmetrics(image_pairs):
    preds, target = image_pairs
    want = peak_signal_noise_ratio(preds, target, data_range=1.0, dim=(1, 2, 3), reduction="none")
    assert torch.allclose(psnr(preds, target), want, rtol=1e-5)
    per_image, pooled = PSNR(), registry.metrics.build("psnr", per_image=False)
    peer = PeakSignalNoiseRatio(data_range=1.0)
    for sl in (slice(0, 2), slice(2, 6)):
        per_image.update(preds[sl], target[sl])
        pooled.update(preds[sl], target[sl])
        peer.update(preds[sl], target[sl])
    assert per_image.compute() == pytest.approx(want.mean().item(), rel=1e-5)
    assert pooled.compute() == pytest.approx(peer.compute().item(), rel=1e-5)


def test_ssim_equals_torchmetrics(image_pairs):
    preds, target = image_pairs
    want = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    assert want.min() > 0.2 and want.max() < 0.99
    assert torch.allclose(ssim(preds, target), want, atol=1e-5)
    ours, peer = SSIM(), StructuralSimilarityIndexMeasure(data_range=1.0)
    for sl in (slice(0, 4), slice(4, 6)):
        ours.update(preds[sl], target[sl])
        peer.update(preds[sl], target[sl])
    assert ours.compute() == pytest.approx(peer.compute().item(), abs=1e-5)
    uint8 = (target * 255).round().to(torch.uint8)
    assert ssim(uint8, uint8).allclose(torch.ones(6))


def test_reconstruction_metrics_reject_bad_input(image_pairs):
    preds, target = image_pairs
    with pytest.raises(ValueError, match="same shape"):
        psnr(preds[:, :, :10], target)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ssim(preds * 2 - 1, target)
    with pytest.raises(StateError, match="no images"):  # a call before any update
        SSIM().compute()
    with pytest.raises(TypeError, match="cannot merge"):
        SSIM().merge(PSNR())

"""Precision/recall (k = 3) on 10k x 2048 features per set: ours (batched) vs torch-fidelity."""

from __future__ import annotations

import pytest
import torch
from torch_fidelity.metric_prc import calculate_precision_recall_full

from latentforge_metrics.generative import precision_recall


@pytest.fixture(scope="module")
def features(full, device):
    n, d = (10000, 2048) if full else (200, 64)
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(n, d, generator=gen).relu()
    fake = (1.1 * torch.randn(n, d, generator=gen) + 0.02).relu()
    return real.to(device), fake.to(device)


def test_ours(measure, features, device):
    real, fake = features
    out = measure(
        lambda: precision_recall(real, fake, k=3, batch_size=5000, device=device),
        group="metrics: precision/recall",
        impl="ours",
        items=real.shape[0] + fake.shape[0],
        unit="samples/s",
    )
    p, r = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    assert out["precision"] == pytest.approx(p, abs=2e-4) and out["recall"] == pytest.approx(r, abs=2e-4)


def test_torch_fidelity(measure, features):
    real, fake = features
    measure(
        lambda: calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000),
        group="metrics: precision/recall",
        impl="torch-fidelity",
        items=real.shape[0] + fake.shape[0],
        unit="samples/s",
    )

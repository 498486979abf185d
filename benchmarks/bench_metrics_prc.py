"""Precision/recall (k = 3) on 10k x 2048 features per set: ours (blocked GEMM) vs torch-fidelity.

The two run interleaved, round by round, so the ratio is a same-run ratio; the fake set is drawn
so that neither number is 0 or 1 and their equality means something.  At full size:

    pytest benchmarks/bench_metrics_prc.py --benchmark-enable
"""

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
    fake = (1.01 * torch.randn(n, d, generator=gen)).relu()  # P, R ≈ 0.2, 0.4 at 2k x 2048
    return real.to(device), fake.to(device)


@pytest.mark.headline
def test_precision_recall(measure_interleaved, features, device):
    real, fake = features
    out = {}

    def ours():
        out["ours"] = precision_recall(real, fake, k=3, batch_size=5000, device=device)

    def peer():
        out["torch-fidelity"] = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)

    measure_interleaved(
        {"ours": ours, "torch-fidelity": peer},
        group="metrics: precision/recall",
        items=real.shape[0] + fake.shape[0],
        unit="samples/s",
        rounds=3,
    )
    p, r = out["torch-fidelity"]
    assert 0 < p < 1 and 0 < r < 1
    # torch-fidelity averages in fp32: equal counts agree to 1e-7, one sample apart is 1e-4 (1/n)
    assert out["ours"] == {"precision": pytest.approx(p, abs=1e-6), "recall": pytest.approx(r, abs=1e-6)}

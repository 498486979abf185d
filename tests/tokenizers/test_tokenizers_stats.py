"""Latent statistics: one exact pass (shards merge exactly), checked against numpy in float64."""

import numpy as np
import pytest
import torch

from latentforge_core.checkpoint import CheckpointError
from latentforge_tokenizers.stats import LatentStats, StatsAccumulator, compute_latent_stats


@pytest.mark.parametrize("reduce", ["element", "channel"])
def test_sharded_pass_equals_numpy(reduce):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(101, 4, 3, 3, generator=g) * torch.linspace(0.5, 3, 4).view(1, 4, 1, 1) + 10.0
    shards = [StatsAccumulator(reduce) for _ in range(3)]
    for i, chunk in enumerate(z.split(17)):  # uneven batches spread over three "ranks"
        shards[i % 3].update(chunk)
    total = shards[0]
    total.merge(shards[1])
    total.merge(shards[2])
    a = z.double().numpy()
    axes = (0, 2, 3) if reduce == "channel" else (0,)
    for unbiased in (False, True):
        stats = total.compute(unbiased=unbiased, eps=0.0)
        mean = a.mean(axis=axes, keepdims=True)[0]
        var = a.var(axis=axes, ddof=int(unbiased), keepdims=True)[0]
        np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-6)
        np.testing.assert_allclose(stats.var.numpy(), var, rtol=1e-5)
    assert total.count == (101 * 9 if reduce == "channel" else 101)


def test_compute_latent_stats_and_files(tmp_path):
    images = [torch.rand(5, 2, 4, 4) for _ in range(3)]
    stats = compute_latent_stats(lambda x: 2 * x + 1, images, with_mean=False)
    assert stats.mean is None
    torch.testing.assert_close(stats.var, torch.cat(images).mul(2).var(0, correction=0))
    stats.save(tmp_path / "s.safetensors")
    again = LatentStats.load(tmp_path / "s.safetensors")
    assert again.eps == 1e-5 and again.mean is None
    torch.testing.assert_close(again.var, stats.var)


def test_bad_statistics(tmp_path):
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        LatentStats(torch.ones(2, 3))
    with pytest.raises(ValueError, match="mean .* and var .* differ"):
        LatentStats(torch.ones(4, 2, 2), torch.zeros(4, 1, 1))
    with pytest.raises(ValueError, match="non-negative"):
        LatentStats(-torch.ones(4, 1, 1))
    with pytest.raises(ValueError, match="reduce"):
        StatsAccumulator("batch")
    acc = StatsAccumulator()
    acc.update(torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match="cannot join"):
        acc.update(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match="not enough"):
        StatsAccumulator().compute()
    with pytest.raises(CheckpointError, match="expected a dict"):
        torch.save(torch.zeros(3), tmp_path / "x.pt")
        LatentStats.load(tmp_path / "x.pt")

"""Attention throughput: core's dispatcher (SDPA on CPU, xformers on CUDA) vs the written-out formula."""

import pytest
import torch

from latentforge_core import attention


@pytest.mark.parametrize("impl", ["ours", "math"])
def test_attention_tokens_per_second(measure, full, device, impl):
    b, h, n, d = (32, 12, 256, 64) if full else (2, 2, 16, 8)  # dit-b-2 at 256 px: 256 tokens, 12 heads
    q, k, v = (torch.randn(b, h, n, d, device=device) for _ in range(3))
    backend = "auto" if impl == "ours" else "math"
    out = measure(
        lambda: attention(q, k, v, backend=backend),
        group="attention-b12x256x64",
        impl=impl,
        items=b * n,
        unit="tokens/s",
        flops=4 * b * h * n * n * d,
    )
    assert out.shape == (b, h, n, d)

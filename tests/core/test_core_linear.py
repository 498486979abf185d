"""core.linear: the oneDNN GEMM path equals F.linear in value and in every gradient, and steps aside
where it does not apply (autocast, other dtypes)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from latentforge_core import linear as lin


@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_with_gradients(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 96, generator=gen, requires_grad=True)  # 2.6M multiply-adds: oneDNN's size
    w = torch.randn(128, 96, generator=gen, requires_grad=True)
    b = torch.randn(128, generator=gen, requires_grad=True) if bias else None
    grad = torch.randn(3, 70, 128, generator=gen)
    ours = lin.linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    inputs = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad(ours, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_module_keeps_nn_linear_keys_and_falls_back_where_it_does_not_apply():
    layer = lin.Linear(1024, 1024)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(5, 1024)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # F.linear under autocast, as nn.Linear would be
    assert lin.Linear(8, 4).double()(x[:, :8].double()).dtype == torch.float64
    if lin._ONEDNN:  # the custom op is what runs for fp32 on CPU
        from torch.profiler import profile

        with profile() as prof:
            layer(x)
        assert any("onednn_linear" in e.name for e in prof.events())
        with profile() as prof:  # a decoding step's small product: F.linear, below oneDNN's fixed cost
            lin.Linear(256, 256)(x[:1, :256])
        assert not any("onednn_linear" in e.name for e in prof.events())


def test_flop_counter_counts_the_onednn_op_like_f_linear():
    """Benchmarks report MFU from torch's FlopCounterMode: the custom op must count as F.linear does."""
    layer = lin.Linear(256, 512)
    x = torch.randn(3, 7, 256, requires_grad=True)
    counts = []
    for forward in (layer, lambda x: F.linear(x, layer.weight, layer.bias)):
        with FlopCounterMode(display=False) as counter:
            forward(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 21 * 256 * 512  # forward, input and weight gradients
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # the kernel without the op
        out = layer(x)
    assert counter.get_total_flops() == 2 * 21 * 256 * 512
    assert torch.equal(out, layer(x).detach())  # the same kernel as through the op

import random

import numpy as np
import pytest
import torch

from latentforge_core import attention
from latentforge_core.attention import resolve_backend, split_heads, xformers_available
from latentforge_core.device import (
    autocast,
    default_dtype,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)


def qkv(n=5, m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (
        torch.randn(2, 3, n, 8, generator=g),
        torch.randn(2, 3, m, 8, generator=g),
        torch.randn(2, 3, m, 8, generator=g),
    )


def reference(q, k, v, mask=None):
    """Attention written out in float64, the textbook formula."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).float()


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_backends_agree_with_the_formula(backend):
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, backend=backend), reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causal_mask_aligns_to_the_end_for_a_kv_cache(backend):
    q, k, v = qkv(n=7)
    full = attention(q, k, v, is_causal=True, backend=backend)
    tail = attention(q[:, :, -2:], k, v, is_causal=True, backend=backend)  # the last 2 queries over all keys
    torch.testing.assert_close(tail, full[:, :, -2:], atol=1e-6, rtol=1e-6)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(full, reference(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_split_heads_matches_the_channel_layout_and_its_gradient():
    """q, k, v are channel blocks of the fused projection, heads contiguous inside each block."""
    qkv = torch.randn(2, 5, 3 * 4 * 3, requires_grad=True)  # B, N, 3·H·D with H = 4, D = 3
    q, k, v = split_heads(qkv, num_heads=4)
    expected = qkv.detach().reshape(2, 5, 3, 4, 3).permute(2, 0, 3, 1, 4)  # three, B, H, N, D
    for got, want in zip((q, k, v), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = torch.randn(3, 2, 4, 5, 3)
    sum((w * t).sum() for w, t in zip(weights, (q, k, v), strict=True)).backward()
    torch.testing.assert_close(qkv.grad, weights.permute(1, 3, 0, 2, 4).reshape(2, 5, 36), rtol=0, atol=0)


def test_boolean_and_additive_masks():
    q, k, v = qkv(n=4, m=6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    expected = reference(q, k, v, mask)
    torch.testing.assert_close(
        attention(q, k, v, attn_mask=mask, backend="math"), expected, atol=1e-5, rtol=1e-5
    )
    additive = torch.zeros(4, 6).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(
        attention(q, k, v, attn_mask=additive, backend="sdpa"), expected, atol=1e-5, rtol=1e-5
    )


def test_bad_input_and_backend_selection():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"4-D \[B, H, N, D\].*q\(3, 5, 8\)"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        attention(q, k, v, backend="flash3")
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    if not (xformers_available() and torch.cuda.is_available()):
        with pytest.raises(RuntimeError, match="needs the xformers package and CUDA tensors"):
            attention(q, k, v, backend="xformers")


def test_precision_defaults():
    cpu = torch.device("cpu")
    assert default_dtype(cpu) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_seed_and_rng_state_round_trip(tmp_path):
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    state = rng_state()
    expected = draws()
    torch.save(state, tmp_path / "rng.pt")
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected
    with pytest.raises(ValueError, match="seed must be in"):
        seed_everything(-1)


def test_preprocessing_round_trips_through_json():
    import json

    from latentforge_core import Preprocessing

    prep = Preprocessing(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data = json.loads(json.dumps(prep.to_dict()))
    assert data["mean"] == [0.485, 0.456, 0.406]
    assert Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}) == prep

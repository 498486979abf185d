"""Core's transformer kit: defined once (an AST walk over every package's sources), used by the ViT
encoders, the DiT family and the token models, and each part against its textbook definition,
written out in float64 (RMSNorm, 1-D and 2-D rotary, sin-cos tables, softmax(QKᵀ/√d)V attention with
its causal, KV-cache, QK-norm and rotary options, GELU feed-forward, SwiGLU)."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from latentforge_core.transformer import (
    Attention,
    KVCache,
    Mlp,
    RMSNorm,
    RoPE2D,
    RotaryEmbedding,
    SwiGLU,
    gelu_tanh,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)

ROOT = Path(__file__).resolve().parents[2]
KIT = "packages/core/src/latentforge_core/transformer.py"

# ------------------------------------------------------------------------------------------------
# One definition of each part
# ------------------------------------------------------------------------------------------------
# A class is a transformer part when its name ends in one of these (any prefix: ``ViTAttention``,
# ``_SelfAttention``, ``LlamaMLP``); rotary classes and sin-cos table functions by a name part.
# Each kind may be defined in one module only: a second definition is a copy of the kit.
CLASS_KINDS = {
    "attention": r"Attention$",
    "mlp": r"(Mlp|MLP)$",
    "swiglu": r"SwiGLU$",
    "rmsnorm": r"RMSNorm$",
    "layernorm": r"LayerNorm$",
    "layerscale": r"LayerScale$",
    "rotary": r"(Rotary|RoPE)",
    "kv cache": r"KVCache$",
}
FUNCTION_KINDS = {"sin-cos table": r"sin_?cos"}
# Definitions that match a kind without being a copy of the kit's part, with the reason.
ALLOWED = {
    (
        "packages/tokenizers/src/latentforge_tokenizers/rae.py",
        "_SelfAttention",
    ): "holds HF ViT-MAE's separate query/key/value (no forward): the released RAE decoders' key "
    "layout, pinned by test_released_decoder_layouts; the kit's Attention fuses them into qkv",
}


def definitions() -> dict[str, list[tuple[str, str]]]:
    """kind → [(source file, name)] over every class and function in packages/*/src."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(ROOT.glob("packages/*/src/**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.ClassDef):
                kinds = CLASS_KINDS
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kinds = FUNCTION_KINDS
            else:
                continue
            for kind, pattern in kinds.items():
                if re.search(pattern, node.name) and (rel, node.name) not in ALLOWED:
                    found.setdefault(kind, []).append((rel, node.name))
    return found


def test_each_transformer_part_is_defined_in_one_module():
    found = definitions()
    copies = {kind: where for kind, where in found.items() if len({rel for rel, _ in where}) > 1}
    assert not copies, f"transformer parts defined in more than one module (use core's kit): {copies}"
    for kind in ("attention", "mlp", "swiglu", "rmsnorm", "rotary", "kv cache", "sin-cos table"):
        assert {rel for rel, _ in found[kind]} == {KIT}, kind
    assert all(ALLOWED.values())  # every exception says why


def test_the_walk_sees_a_copy():
    """The check is not vacuous: a second Attention anywhere is a copy."""
    tree = ast.parse("class ViTAttention:\n    pass\n\nclass LlamaMLP:\n    pass\n")
    names = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert [k for n in names for k, p in CLASS_KINDS.items() if re.search(p, n)] == ["attention", "mlp"]


def test_encoders_dit_and_token_models_are_built_from_the_kit():
    from latentforge_encoders.vit import VisionTransformer
    from latentforge_generators.gpt import GPT
    from latentforge_generators.lightningdit import LightningDiT

    vit = VisionTransformer(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, ffn="swiglu")
    dit = LightningDiT(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    gpt = GPT(vocab_size=8, grid_size=2, num_classes=2, dim=32, depth=1, num_heads=2, style="modern")
    for block in (vit.blocks[0], dit.blocks[0], gpt.transformer.blocks[0]):
        assert type(block.attn) is Attention and type(block.mlp) is SwiGLU
    assert type(dit.blocks[0].norm1) is RMSNorm and type(gpt.transformer.norm) is RMSNorm
    assert type(dit.feat_rope) is RoPE2D and type(gpt.transformer.rope) is RotaryEmbedding


# ------------------------------------------------------------------------------------------------
# The parts against their definitions
# ------------------------------------------------------------------------------------------------
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.ndim > 1 else 4))
    return module


def test_rmsnorm_is_x_over_its_root_mean_square_times_the_scale():
    norm = randomize(RMSNorm(24, eps=1e-5))
    x = torch.randn(3, 7, 24)
    ms = x.double().square().mean(-1, keepdim=True)
    want = x.double() / torch.sqrt(ms + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, atol=1e-6, rtol=1e-6)
    torch_norm = nn.RMSNorm(24, eps=1e-5)
    torch_norm.weight.data.copy_(norm.weight)
    assert torch.equal(norm(x), torch_norm(x))  # in fp32 it is nn.RMSNorm to the bit
    # bf16: normalised in fp32, cast, then scaled (transformers' LlamaRMSNorm: weight · normed.to(dtype))
    xb, nb = x.bfloat16(), RMSNorm(24, eps=1e-5).bfloat16()
    nb.weight.data.copy_(norm.weight)
    xf = xb.float()
    llama = nb.weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-5)).bfloat16()
    torch.testing.assert_close(nb(xb), llama, atol=0, rtol=8e-3)


def rotate_half_split(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama's rotary by definition: channel i and i + d/2 form the complex number turned by
    ``pos · theta^(-2i/d)``.  ``x [..., N, d]``, ``pos [N]``; float64."""
    d = x.shape[-1]
    angle = pos.double()[:, None] * theta ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)  # N, d/2
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag], dim=-1)


def rotate_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """GPT-J/EVA rotary by definition: adjacent channels (2k, 2k+1) turned by ``pos · theta^(-2k/d)``."""
    d = x.shape[-1]
    angle = pos.double()[:, None] * theta ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)  # N, d/2
    pairs = x.double().unflatten(-1, (-1, 2))
    z = torch.complex(pairs[..., 0], pairs[..., 1]) * torch.polar(torch.ones_like(angle), angle)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def test_rotary_embedding_turns_half_split_pairs_by_position():
    rope = RotaryEmbedding(head_dim=16, max_positions=40, theta=500.0)
    x = torch.randn(2, 3, 11, 16)
    want = rotate_half_split(x, torch.arange(5, 16), theta=500.0)
    torch.testing.assert_close(rope(x, start=5).double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(x[..., 4:6, :], start=9), rope(x, start=5)[..., 4:6, :], atol=0, rtol=0)
    # what makes it rotary: scores depend on the offset between positions only
    q, k = torch.randn(2, 1, 1, 16).unbind(0)
    score = lambda p, m: (rope(q, start=p) * rope(k, start=m)).sum()
    torch.testing.assert_close(score(7, 3), score(30, 26), atol=1e-5, rtol=1e-5)


def test_rope2d_turns_adjacent_pairs_by_row_then_by_column():
    grid, head_dim = 5, 24
    rope = RoPE2D(head_dim, grid)
    x = torch.randn(2, 3, grid * grid, head_dim)
    tokens = torch.arange(grid * grid)
    row, col = tokens // grid, tokens % grid
    half = head_dim // 2
    want = torch.cat([rotate_pairs(x[..., :half], row), rotate_pairs(x[..., half:], col)], dim=-1)
    torch.testing.assert_close(rope(x).double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no offset"):
        rope(x, start=1)


def test_sincos_tables_are_the_mae_formula():
    d, n = 12, 9
    want = torch.tensor(
        [
            [math.sin(p / 10000 ** (2 * k / d)) for k in range(d // 2)]
            + [math.cos(p / 10000 ** (2 * k / d)) for k in range(d // 2)]
            for p in range(n)
        ]
    )
    torch.testing.assert_close(sincos_pos_embed_1d(d, n), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_pos_embed_1d(d, torch.arange(3, 6)), want[3:6], atol=1e-6, rtol=0)
    grid, d2 = 4, 16
    table = sincos_pos_embed_2d(d2, grid, extra_tokens=1)
    assert table.shape == (1 + grid * grid, d2) and not table[0].any()  # the CLS slot is zero
    for t in range(grid * grid):  # row-major tokens: the first half encodes the column
        r, c = divmod(t, grid)
        expected = torch.cat(
            [
                sincos_pos_embed_1d(d2 // 2, torch.tensor([c])),
                sincos_pos_embed_1d(d2 // 2, torch.tensor([r])),
            ],
            dim=1,
        )
        torch.testing.assert_close(table[1 + t], expected[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(10, 2)


def explicit_attention(attn: Attention, x, *, causal=False, q_norm=None, k_norm=None, rotate=None):
    """``proj(softmax(QKᵀ/√d)V)`` with every step written out in float64."""
    h, dim = attn.num_heads, x.shape[-1]
    w, b = attn.qkv.weight.double(), attn.qkv.bias
    qkv = x.double() @ w.T + (b.double() if b is not None else 0)  # B, N, 3D
    q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in qkv.split(dim, dim=-1))  # B, H, N, Dh
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // h)  # B, H, N, N
    if causal:
        n = x.shape[1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # B, N, D
    pb = attn.proj.bias
    return out @ attn.proj.weight.double().T + (pb.double() if pb is not None else 0)


@pytest.mark.parametrize("split_qkv_on_cpu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_softmax_qk_over_sqrt_d_times_v(split_qkv_on_cpu, bias, causal):
    attn = randomize(Attention(32, 4, qkv_bias=bias, proj_bias=bias, split_qkv_on_cpu=split_qkv_on_cpu))
    x = torch.randn(2, 9, 32)
    want = explicit_attention(attn, x, causal=causal)
    torch.testing.assert_close(attn(x, causal=causal).double(), want, atol=1e-5, rtol=1e-5)


def test_attention_with_qk_norm_and_rotary_hooks():
    x = torch.randn(2, 16, 32)
    attn = randomize(Attention(32, 2, qk_norm=True))

    def rms(norm):
        return lambda t: t / torch.sqrt(t.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    rope2d = RoPE2D(16, 4)
    tokens = torch.arange(16)
    rotate = lambda t: torch.cat(
        [rotate_pairs(t[..., :8], tokens // 4), rotate_pairs(t[..., 8:], tokens % 4)], -1
    )
    want = explicit_attention(attn, x, q_norm=rms(attn.q_norm), k_norm=rms(attn.k_norm), rotate=rotate)
    torch.testing.assert_close(attn(x, rope2d).double(), want, atol=1e-5, rtol=1e-5)
    # 1-D rotary, q and k turned together over one view of the fused projection (no QK-norm)
    plain = randomize(Attention(32, 2, qkv_bias=False, proj_bias=False), seed=1)
    rope = RotaryEmbedding(16, 32)
    want = explicit_attention(
        plain, x, causal=True, rotate=lambda t: rotate_half_split(t, torch.arange(3, 19))
    )
    torch.testing.assert_close(plain(x, rope, start=3, causal=True).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_rope", [False, True])
def test_kv_cache_decoding_equals_the_causal_forward(with_rope):
    attn = randomize(Attention(32, 4)).eval()
    rope = RotaryEmbedding(8, 20) if with_rope else None
    x = torch.randn(3, 10, 32)
    full = attn(x, rope, causal=True)
    cache = KVCache(depth=2, batch=3, heads=4, head_dim=8, max_len=10)
    steps = [attn(x[:, :4], rope, start=0, cache=cache, layer=1, causal=True)]  # a prefill, then one by one
    steps += [attn(x[:, i : i + 1], rope, start=i, cache=cache, layer=1, causal=True) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)
    assert not cache.k[0].any()  # layer 0 untouched
    with pytest.raises(ValueError, match="holds 10 positions"):
        cache.update(1, torch.zeros(3, 4, 1, 8), torch.zeros(3, 4, 1, 8), start=10)


def test_attention_calls_the_given_attend_function():
    calls = []

    def attend(q, k, v, **kwargs):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    attn = Attention(16, 2, attend=attend)
    attn(torch.randn(1, 3, 16))
    assert calls == [(1, 2, 3, 8)]
    with pytest.raises(ValueError, match="divisible by num_heads 3"):
        Attention(16, 3)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_mlp_is_fc2_of_gelu_of_fc1_with_and_without_autograd(act):
    mlp = randomize(Mlp(12, 40, act=act))
    x = torch.randn(2, 5, 12)
    h = x.double() @ mlp.fc1.weight.double().T + mlp.fc1.bias.double()
    if act == "gelu":
        g = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:
        g = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    want = g @ mlp.fc2.weight.double().T + mlp.fc2.bias.double()
    with_grad = mlp(x)
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.double(), want, atol=1e-5, rtol=1e-5)
    before = x.clone()
    with torch.no_grad():  # the activation runs in place on fc1's output: same values, x untouched
        assert torch.equal(mlp(x), with_grad.detach())
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="act must be one of"):
        Mlp(4, 8, act="relu")


def test_gelu_tanh_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    want = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu_tanh(x), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_is_w3_of_silu_gate_times_value(bias):
    swiglu = randomize(SwiGLU(12, 20, bias=bias))
    x = torch.randn(2, 5, 12)
    both = x.double() @ swiglu.w12.weight.double().T + (swiglu.w12.bias.double() if bias else 0)
    gate, value = both[..., :20], both[..., 20:]  # gate rows first
    hidden = gate * torch.sigmoid(gate) * value
    want = hidden @ swiglu.w3.weight.double().T + (swiglu.w3.bias.double() if bias else 0)
    torch.testing.assert_close(swiglu(x).double(), want, atol=1e-5, rtol=1e-5)
    assert (swiglu.w12.bias is None) == (not bias)

"""LightningDiT: its parts against transformers' (GPT-J rotary, Llama SwiGLU/RMSNorm), the released
checkpoint layout, the DiT skeleton against diffusers, QK-norm, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from latentforge_core.checkpoint import CheckpointError
from latentforge_generators.convert import load_official, to_diffusers
from latentforge_generators.layers import RMSNorm, RoPE2D, SwiGLU
from latentforge_generators.lightningdit import SIZES, LightningDiT, RAELightningDiT

TINY = dict(input_size=4, in_channels=8, num_classes=10)


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1] if p.ndim > 1 else 50))
    return model


def inputs(model, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    s = model.input_size
    return (torch.randn(batch, model.in_channels, s, s, generator=gen), torch.tensor([0.0, 0.5, 1.0])[:batch],
            torch.tensor([1, 10, 4])[:batch])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Parts against implementations someone else wrote
# ------------------------------------------------------------------------------------------------
def test_rope_matches_gptj_rotary_on_each_axis():
    """2-D RoPE = GPT-J's interleaved-pair rotary applied with the row index to the first half of
    each head and with the column index to the second half."""
    head_dim, grid = 24, 5
    half = head_dim // 2
    q = torch.randn(2, 3, grid * grid, head_dim)  # B, H, N, D
    ours = RoPE2D(head_dim, grid)(q)
    sincos = create_sinusoidal_positions(grid, half)
    sin, cos = sincos[:, : half // 2], sincos[:, half // 2 :]
    tokens = torch.arange(grid * grid)
    row, col = tokens // grid, tokens % grid
    q_gptj = q.transpose(1, 2)  # GPT-J layout: B, N, H, D
    first = apply_rotary_pos_emb(q_gptj[..., :half], sin[row][None], cos[row][None])
    second = apply_rotary_pos_emb(q_gptj[..., half:], sin[col][None], cos[col][None])
    torch.testing.assert_close(ours, torch.cat([first, second], dim=-1).transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_swiglu_and_rmsnorm_match_llama():
    dim, hidden = 48, int(2 / 3 * 4 * 48)
    ours = randomize(SwiGLU(dim, hidden))
    config = LlamaConfig(
        hidden_size=dim, intermediate_size=hidden, num_attention_heads=4, mlp_bias=True, hidden_act="silu"
    )
    llama = LlamaMLP(config)
    with torch.no_grad():  # w12 holds the gated half first, then the value half
        (
            llama.gate_proj.weight.copy_(ours.w12.weight[:hidden]),
            llama.gate_proj.bias.copy_(ours.w12.bias[:hidden]),
        )
        llama.up_proj.weight.copy_(ours.w12.weight[hidden:]), llama.up_proj.bias.copy_(ours.w12.bias[hidden:])
        llama.down_proj.weight.copy_(ours.w3.weight), llama.down_proj.bias.copy_(ours.w3.bias)
    x = torch.randn(2, 7, dim)
    torch.testing.assert_close(ours(x), llama(x), atol=1e-5, rtol=1e-5)

    norm, llama_norm = RMSNorm(dim), LlamaRMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), llama_norm.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x), llama_norm(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norm(x.bfloat16()), llama_norm(x.bfloat16()), atol=1e-2, rtol=1e-2)


def test_with_its_switches_off_it_is_dit_and_matches_diffusers():
    switches = dict(use_rmsnorm=False, use_swiglu=False, use_rope=False, learn_sigma=True)
    model = randomize(
        LightningDiT(hidden_size=64, depth=2, num_heads=4, patch_size=2, **switches, **TINY)
    ).eval()
    theirs = to_diffusers(model).eval()
    for block in theirs.transformer_blocks:  # the DiT code's sinusoid (see test_generators_dit)
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), theirs(x, t, y).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="plain DiT"):
        to_diffusers(LightningDiT(**SIZES["test-lightningdit"], **TINY))


# ------------------------------------------------------------------------------------------------
# Released checkpoint layout (hustvl/LightningDiT models/lightningdit.py, from the reference)
# ------------------------------------------------------------------------------------------------
def official_lightningdit_layout(depth, d, heads, c_in, patch, grid, qk_norm=False, num_classes=1000):
    hidden, hd, t = int(2 / 3 * 4 * d), d // heads, grid * grid
    layout = {
        "pos_embed": (1, t, d), "feat_rope.freqs_cos": (t, hd), "feat_rope.freqs_sin": (t, hd),
        "x_embedder.proj.weight": (d, c_in, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.norm_final.weight": (d,),
        "final_layer.linear.weight": (patch * patch * c_in, d),
        "final_layer.linear.bias": (patch * patch * c_in,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }  # fmt: skip
    for i in range(depth):
        b = f"blocks.{i}."
        layout |= {
            b + "norm1.weight": (d,), b + "norm2.weight": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.w12.weight": (2 * hidden, d), b + "mlp.w12.bias": (2 * hidden,),
            b + "mlp.w3.weight": (d, hidden), b + "mlp.w3.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        }  # fmt: skip
        if qk_norm:
            layout |= {b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)}
    return layout


def test_released_xl1_layout_and_size():
    with torch.device("meta"):
        model = LightningDiT(**SIZES["lightningdit-xl-1"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_lightningdit_layout(28, 1152, 16, 32, 1, 16)
    assert shapes["blocks.0.mlp.w12.weight"] == (6144, 1152) and shapes["feat_rope.freqs_cos"] == (256, 72)
    # docs/log.txt of the release: 675.26 M parameters including the frozen pos-embed.
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(675.26, abs=0.01)
    for name, size in SIZES.items():
        with torch.device("meta"):
            assert LightningDiT(**size).out_channels == 32, name


@pytest.mark.parametrize("qk_norm", [False, True])
def test_released_state_dict_loads_strictly(tmp_path, qk_norm):
    layout = official_lightningdit_layout(2, 64, 4, 8, 1, 4, qk_norm=qk_norm, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) * 0.1 for k, s in layout.items()}
    path = tmp_path / "0080000.pt"  # train.py: {"model", "ema", "opt", "config"}; inference uses "ema"
    torch.save(
        {"model": {k: v + 1 for k, v in official.items()}, "ema": official, "config": {"lr": 2e-4}}, path
    )
    model = load_official(LightningDiT(**SIZES["test-lightningdit"], use_qknorm=qk_norm, **TINY), path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())
    x, t, y = inputs(model)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x, t, y)).all()


# RAE's own LightningDiT (bytetriper/RAE src/stage2/models/lightningDiT.py, from the reference notes):
# hustvl's layout, except that time enters through Gaussian-Fourier features, t_embedder.W [256],
# and a 512-wide first t-MLP layer; t = 1 is noise, fed raw.
def rae_lightningdit_layout(depth, d, heads, c_in, patch, grid, num_classes=1000):
    layout = official_lightningdit_layout(depth, d, heads, c_in, patch, grid, num_classes=num_classes)
    return layout | {"t_embedder.W": (256,), "t_embedder.mlp.0.weight": (d, 512)}


def test_rae_lightningdit_xl_layout_and_size():
    with torch.device("meta"):
        model = RAELightningDiT(**SIZES["lightningdit-xl-1"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == rae_lightningdit_layout(28, 1152, 16, 768, 1, 16)
    # The RAE paper's DiT-XL on DINOv2-B latents: "676 M" parameters (676.95 M trainable).
    assert int(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6) == 676
    assert RAELightningDiT.time_convention == "noise_at_1" and not model.learn_sigma


def test_rae_lightningdit_state_dict_loads_and_embeds_time_as_rae_does(tmp_path):
    layout = rae_lightningdit_layout(2, 64, 4, 8, 1, 4, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) * 0.1 for k, s in layout.items()}
    path = tmp_path / "ep-0000080.pt"  # RAE's train.py: {"step", "epoch", "model", "ema", …}; ema used
    torch.save({"step": 1, "model": {k: v + 1 for k, v in official.items()}, "ema": official}, path)
    model = load_official(RAELightningDiT(**SIZES["test-lightningdit"], **TINY), path).eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())
    # RAE's forward written out: c = mlp([sin 2πtW, cos 2πtW]) + label row (no SiLU on the sum),
    # then the LightningDiT blocks and final layer on c.
    x, _, y = inputs(model)
    t = torch.tensor([0.0, 0.43, 1.0])
    args = 2 * math.pi * t[:, None] * official["t_embedder.W"][None]
    feats = torch.cat([args.sin(), args.cos()], dim=-1)
    w0, b0, w2, b2 = (official[f"t_embedder.mlp.{i}.{k}"] for i in (0, 2) for k in ("weight", "bias"))
    c = torch.nn.functional.silu(feats @ w0.T + b0) @ w2.T + b2
    c = c + official["y_embedder.embedding_table.weight"][y]
    with torch.no_grad():
        h = model.x_embedder(x) + official["pos_embed"]
        for block in model.blocks:
            h = block(h, c, model.feat_rope)
        expected = model.final_layer(h, c).transpose(1, 2).reshape(x.shape)  # patch 1: tokens → grid
        torch.testing.assert_close(model(x, t, y), expected, atol=1e-5, rtol=1e-5)
    # A hustvl LightningDiT cannot hold it (and says why); the Fourier frequencies must be in the file.
    with pytest.raises(CheckpointError, match=r"t_embedder\.W"):
        load_official(LightningDiT(**SIZES["test-lightningdit"], **TINY), official)
    del official["t_embedder.W"]
    with pytest.raises(CheckpointError, match=r"t_embedder\.W"):
        load_official(RAELightningDiT(**SIZES["test-lightningdit"], **TINY), official)


def test_rope_tables_equal_the_released_formula():
    """freqs_cos/sin rows: token (r, c); first half angles r·f_k, second half c·f_k, pairs repeated."""
    rope = RoPE2D(72, 16)
    f = 1.0 / 10000 ** (torch.arange(0, 36, 2).float() / 36)  # 18 frequencies per axis
    r, c = 3, 11
    expected = torch.cat([(r * f).repeat_interleave(2), (c * f).repeat_interleave(2)])
    torch.testing.assert_close(rope.freqs_cos[r * 16 + c], expected.cos())
    torch.testing.assert_close(rope.freqs_sin[r * 16 + c], expected.sin())


# ------------------------------------------------------------------------------------------------
# Behaviour
# ------------------------------------------------------------------------------------------------
def test_qk_norm_makes_attention_blind_to_query_and_key_scale():
    model = randomize(LightningDiT(**SIZES["test-lightningdit"], use_qknorm=True, **TINY)).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        before = model(x, t, y)
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 64] *= 7.0  # q and k rows
            block.attn.qkv.bias[: 2 * 64] *= 7.0
        torch.testing.assert_close(model(x, t, y), before, atol=1e-4, rtol=1e-4)
        plain = randomize(LightningDiT(**SIZES["test-lightningdit"], **TINY)).eval()
        reference = plain(x, t, y)
        for block in plain.blocks:
            block.attn.qkv.weight[: 2 * 64] *= 7.0
            block.attn.qkv.bias[: 2 * 64] *= 7.0
        assert not torch.allclose(plain(x, t, y), reference, atol=1e-3)


def test_contract_and_bad_input():
    model = LightningDiT(**SIZES["test-lightningdit"], **TINY)
    assert LightningDiT.time_convention == "noise_at_0" and not model.learn_sigma
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes) == (8, 8, 4, 10)
    x, t, y = inputs(model)
    assert model(x, t, y).shape == (3, 8, 4, 4)
    with pytest.raises(ValueError, match=r"\[B, 8, 4, 4\].*\(3, 4, 4, 4\)"):
        model(x[:, :4], t, y)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([1, 2, 12]))
    with pytest.raises(ValueError, match="NaN"):
        model(x.clone().fill_(float("nan")), t, y)
    with pytest.raises(ValueError, match="divisible by 4"):
        LightningDiT(hidden_size=36, num_heads=6, depth=1, **TINY)  # head dim 6: no 2-D RoPE

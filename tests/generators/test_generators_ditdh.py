"""DiT-DH: the released RAE stage-2 layout, the head's per-token conditioning, time embedding, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge_core.checkpoint import CheckpointError
from latentforge_core.device import autocast
from latentforge_generators.convert import load_official
from latentforge_generators.ditdh import SIZES, DiTDH
from latentforge_generators.layers import AdaLNBlock

TINY = dict(input_size=4, in_channels=12, num_classes=10)


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
    return (torch.randn(batch, model.in_channels, s, s, generator=gen), torch.tensor([1.0, 0.5, 0.0])[:batch],
            torch.tensor([1, 10, 4])[:batch])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Released checkpoint layout (bytetriper/RAE src/stage2/models/DDT.py, from the reference)
# ------------------------------------------------------------------------------------------------
def official_ditdh_layout(d, depth, heads, dh, head_depth, head_heads, c, grid, num_classes=1000):
    t = grid * grid
    layout = {
        "x_embedder.proj.weight": (dh, c, 1, 1), "x_embedder.proj.bias": (dh,),
        "s_embedder.proj.weight": (d, c, 1, 1), "s_embedder.proj.bias": (d,),
        "t_embedder.W": (256,), "t_embedder.mlp.0.weight": (d, 512), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d), "pos_embed": (1, t, d),
        "enc_feat_rope.freqs_cos": (t, d // heads), "enc_feat_rope.freqs_sin": (t, d // heads),
        "dec_feat_rope.freqs_cos": (t, dh // head_heads), "dec_feat_rope.freqs_sin": (t, dh // head_heads),
        "final_layer.norm_final.weight": (dh,),
        "final_layer.linear.weight": (c, dh), "final_layer.linear.bias": (c,),
        "final_layer.adaLN_modulation.1.weight": (2 * dh, dh),
        "final_layer.adaLN_modulation.1.bias": (2 * dh,),
    }  # fmt: skip
    if d != dh:
        layout |= {"s_projector.weight": (dh, d), "s_projector.bias": (dh,)}
    for i in range(depth + head_depth):
        w = d if i < depth else dh
        hidden, b = int(2 / 3 * 4 * w), f"blocks.{i}."
        layout |= {
            b + "norm1.weight": (w,), b + "norm2.weight": (w,),
            b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
            b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "mlp.w12.weight": (2 * hidden, w), b + "mlp.w12.bias": (2 * hidden,),
            b + "mlp.w3.weight": (w, hidden), b + "mlp.w3.bias": (w,),
            b + "adaLN_modulation.1.weight": (6 * w, w), b + "adaLN_modulation.1.bias": (6 * w,),
        }  # fmt: skip
    return layout


@pytest.mark.parametrize(
    "name,d,depth,heads,params", [("ditdh-xl", 1152, 28, 16, 838.7), ("ditdh-s", 384, 12, 6, 196)]
)
def test_released_layouts_and_sizes(name, d, depth, heads, params):
    with torch.device("meta"):
        model = DiTDH(**SIZES[name])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_ditdh_layout(d, depth, heads, 2048, 2, 16, 768, 16)
    assert shapes[f"blocks.{depth + 1}.mlp.w12.weight"] == (2 * 5461, 2048) and shapes[
        "dec_feat_rope.freqs_cos"
    ] == (256, 128)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, rel=3e-3)


def test_released_state_dict_loads_strictly(tmp_path):
    layout = official_ditdh_layout(32, 2, 4, 48, 1, 4, 12, 4, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) * 0.1 for k, s in layout.items()}
    path = tmp_path / "stage2_model.pt"  # a raw EMA state dict
    torch.save(official, path)
    model = load_official(DiTDH(hidden_size=32, depth=2, num_heads=4, head_hidden_size=48, head_depth=1,
                                head_num_heads=4, **TINY), path)  # fmt: skip
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())
    x, t, y = inputs(model)
    with torch.no_grad():
        assert model.eval()(x, t, y).abs().sum() > 0
    del official["t_embedder.W"]  # the Fourier frequencies must come from the checkpoint
    with pytest.raises(CheckpointError, match="t_embedder.W"):
        load_official(DiTDH(**SIZES["test-ditdh"], **TINY), official)


# ------------------------------------------------------------------------------------------------
# Behaviour
# ------------------------------------------------------------------------------------------------
def test_per_token_condition_equals_per_image_when_tokens_agree():
    """The head's per-token adaLN reduces to DiT's per-image adaLN for a constant condition."""
    block = randomize(AdaLNBlock(32, 4, rmsnorm=True, swiglu=True))
    x, c = torch.randn(2, 9, 32), torch.randn(2, 32)
    torch.testing.assert_close(block(x, c[:, None].expand(2, 9, 32)), block(x, c), atol=1e-6, rtol=1e-5)
    c_tok = c[:, None].repeat(1, 9, 1)
    c_tok[:, 4] += 1.0  # one token's condition changes → mostly that token's output changes
    delta = (block(x, c_tok) - block(x, c)).abs().sum(-1)  # B, N
    assert (delta[:, 4] > 10 * delta[:, :4].max(dim=1).values).all()


def test_head_sees_the_backbone_and_the_time_embedding_is_fourier():
    model = randomize(DiTDH(**SIZES["test-ditdh"], **TINY)).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        out = model(x, t, y)
        assert not torch.allclose(
            model(x, t, torch.tensor([2, 3, 5])), out
        )  # labels act via the backbone only
        w = model.t_embedder.W
        feats = torch.cat([torch.sin(2 * torch.pi * 0.25 * w), torch.cos(2 * torch.pi * 0.25 * w)])
        torch.testing.assert_close(model.t_embedder(torch.tensor([0.25]))[0], model.t_embedder.mlp(feats))
    assert not model.t_embedder.W.requires_grad and not model.pos_embed.requires_grad


def test_contract_and_bad_input():
    model = DiTDH(**SIZES["test-ditdh"], **TINY)
    assert DiTDH.time_convention == "noise_at_1" and not model.learn_sigma
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes) == (12, 12, 4, 10)
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros(3, 12, 4, 4))  # zero-initialised final layer
    with pytest.raises(ValueError, match=r"\[B, 12, 4, 4\].*\(3, 12, 5, 5\)"):
        model(torch.randn(3, 12, 5, 5), t, y)
    with pytest.raises(ValueError, match=r"\[0, 10\].*\[1, 11\]"):
        model(x, t, torch.tensor([1, 11, 4]))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x.index_fill(2, torch.tensor([1]), float("inf")), t, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_mixed_precision_path_runs_and_stays_close(dtype):
    """The bf16 autocast path (GPU default) on CPU: RMSNorm/RoPE in fp32, output near the fp32 one."""
    model = randomize(DiTDH(**SIZES["test-ditdh"], **TINY)).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        reference = model(x, t, y)
        with autocast(torch.device("cpu"), dtype):
            mixed = model(x, t, y)
    assert mixed.dtype == dtype
    rel = (mixed.float() - reference).norm() / reference.norm()
    assert rel < 0.05, rel

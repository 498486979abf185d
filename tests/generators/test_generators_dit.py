"""DiT: conformance with diffusers' DiTTransformer2DModel, the official key layout, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError
from latentforge_generators.convert import (
    dit_to_diffusers_state_dict,
    from_diffusers,
    load_official,
    official_state_dict,
    to_diffusers,
)
from latentforge_generators.dit import SIZES, DiT
from latentforge_generators.layers import gelu_tanh
from latentforge_generators.lightningdit import SIZES as LIGHTNINGDIT_SIZES
from latentforge_generators.lightningdit import LightningDiT

TINY = dict(input_size=8, in_channels=4, num_classes=10)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every trainable weight by a random one of sensible scale (adaLN-Zero's zeros too,
    otherwise the blocks would be the identity and the comparison empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                fan_in = p.shape[-1] if p.ndim > 1 else 50
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def inputs(model, batch=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.randn(batch, model.in_channels, s, s, generator=gen)
    t = torch.tensor([0.0, 0.37, 0.9, 1.0])[:batch]
    y = torch.tensor([0, 3, model.num_classes, 9])[:batch]  # includes the null class
    return x, t, y


# ------------------------------------------------------------------------------------------------
# Conformance with diffusers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,learn_sigma", [(1, False), (2, True), (4, False)])
def test_matches_diffusers_on_same_weights(patch, learn_sigma):
    ours = randomize(
        DiT(patch_size=patch, hidden_size=64, depth=2, num_heads=4, learn_sigma=learn_sigma, **TINY)
    )
    theirs = to_diffusers(ours).eval()
    # diffusers' port divides its sinusoid frequencies by half-1; the converter reproduces that.
    back = from_diffusers(theirs).eval()
    x, t = inputs(ours)[:2]
    t = t * 999  # DDPM-style steps, as diffusers' pipelines feed them
    y = torch.tensor([0, 3, 10, 9])
    with torch.no_grad():
        expected = theirs(x, t, y).sample
        got = back(x, t, y)
    assert got.shape == expected.shape == (4, ours.out_channels, 8, 8)
    assert expected.abs().max() > 0.1  # a real signal, not adaLN-Zero's zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def diffusers_dit(norm_eps: float, differing_blocks=(), depth: int = 3):
    """A ``DiTTransformer2DModel`` with random weights, built by diffusers itself; every block's
    embedder copy equals block 0's except those of ``differing_blocks`` (a fine-tune's drift)."""
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=depth,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=norm_eps,
    )  # fmt: skip
    randomize(theirs)
    first = theirs.transformer_blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(theirs.transformer_blocks):
        if i and i not in differing_blocks:
            block.norm1.emb.load_state_dict(first)
    return theirs.eval()


@pytest.mark.parametrize("norm_eps", [1e-6, 1e-5, 1e-3])
def test_from_diffusers_is_exact_for_its_norm_eps(norm_eps):
    """diffusers' second LayerNorm of each block uses ``config.norm_eps``; ours takes it as
    ``norm_eps`` and writes it back (1e-3 is there because 1e-5 against 1e-6 moves the output by
    less than the tolerance)."""
    theirs = diffusers_dit(norm_eps)
    ours = from_diffusers(theirs).eval()
    assert ours.norm_eps == norm_eps and all(b.norm2.eps == norm_eps for b in ours.blocks)
    x, t, y = inputs(ours)
    with torch.no_grad():
        expected = theirs(x, t * 999, y).sample
        got = ours(x, t * 999, y)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    back = to_diffusers(ours).eval()
    assert back.config.norm_eps == norm_eps
    with torch.no_grad():
        torch.testing.assert_close(back(x, t * 999, y).sample, expected, atol=1e-5, rtol=1e-5)


def test_from_diffusers_refuses_per_block_embedders_that_differ():
    """A fine-tune's per-block embedder copies drift apart; our DiT has one embedder, so the
    conversion is refused, naming the blocks, instead of silently keeping block 0's."""
    with pytest.raises(CheckpointError, match=r"transformer_blocks 1, 3 differ from block 0") as err:
        from_diffusers(diffusers_dit(1e-6, differing_blocks=(1, 3), depth=4))
    assert "block 2" not in str(err.value) and "timestep_embedder" in str(err.value)


def test_dit_frequencies_match_diffusers_with_its_shift_removed():
    """Our default (the DiT code's sinusoid) equals diffusers once its frequency shift is 0."""
    ours = randomize(DiT(**SIZES["test-dit"], **TINY)).eval()
    theirs = to_diffusers(ours).eval()
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t * 999, y), theirs(x, t * 999, y).sample, atol=1e-5, rtol=1e-5)


def test_converter_round_trip_is_lossless():
    ours = randomize(DiT(**SIZES["test-dit"], **TINY))
    back = from_diffusers(to_diffusers(ours), time_freq_shift=0)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0)
    assert len(dit_to_diffusers_state_dict(ours.state_dict())) > 0


def test_training_gradients_match_diffusers():
    """The backward pass agrees too (eval mode: no label dropout, so both see the same labels)."""
    ours = randomize(DiT(hidden_size=64, depth=2, num_heads=4, patch_size=2, **TINY))
    theirs = to_diffusers(ours).eval()
    back = from_diffusers(theirs).eval()
    x, t, y = inputs(ours)
    back(x, t * 999, y).square().mean().backward()
    theirs(x, t * 999, y).sample.square().mean().backward()
    ours_grad = back.blocks[1].attn.qkv.weight.grad
    theirs_grad = torch.cat(
        [getattr(theirs.transformer_blocks[1].attn1, f"to_{n}").weight.grad for n in "qkv"]
    )
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Official checkpoint layout (facebookresearch/DiT models.py, written out from the reference)
# ------------------------------------------------------------------------------------------------
def official_dit_layout(depth, d, c_in, patch, grid, num_classes=1000, learn_sigma=True):
    c_out = 2 * c_in if learn_sigma else c_in
    layout = {
        "pos_embed": (1, grid * grid, d),
        "x_embedder.proj.weight": (d, c_in, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.linear.weight": (patch * patch * c_out, d),
        "final_layer.linear.bias": (patch * patch * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }  # fmt: skip
    for i in range(depth):
        layout |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        }  # fmt: skip
    return layout


def test_official_layout_of_every_size():
    sizes = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}
    for name, size in SIZES.items():  # dit-* and REPA's sit-* rows share the layout
        if name.startswith("test-"):
            continue
        depth, d = sizes[name.split("-")[1].upper()]
        for patch in (1, 2, 4, 8):  # the registered /2 and the paper's other patch sizes
            with torch.device("meta"):
                model = DiT(**{**size, "patch_size": patch})
            expected = official_dit_layout(depth, d, 4, patch, 32 // patch)
            assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected, (name, patch)
    # The reference's DiT-XL/2 figures: qkv [3456, 1152], final linear [32, 1152], 675 M parameters.
    with torch.device("meta"):
        xl = DiT(**SIZES["dit-xl-2"])
    assert sum(p.numel() for p in xl.parameters() if p.requires_grad) == pytest.approx(675e6, rel=1e-3)


def test_official_state_dict_loads_strictly_and_is_used(tmp_path):
    layout = official_dit_layout(2, 64, 4, 2, 4, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) * 0.1 for k, s in layout.items()}
    # DiT's train.py saves {"model", "ema", "opt", "args"}; sample.py reads EMA weights.
    model_weights = {k: torch.zeros_like(v) for k, v in official.items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": model_weights, "ema": official}, path)
    model = load_official(DiT(**SIZES["test-dit"], **TINY), path)
    for k, v in official.items():
        assert torch.equal(model.state_dict()[k], v), k
    x, t, y = inputs(model)
    with torch.no_grad():
        assert model.eval()(x, t, y).abs().sum() > 0
    # Wrapper prefixes of DDP / torch.compile are stripped.
    wrapped = {f"module._orig_mod.{k}": v for k, v in official.items()}
    assert official_state_dict(wrapped).keys() == official.keys()


def test_checkpoint_of_another_size_names_the_keys():
    big = {k: torch.zeros(s) for k, s in official_dit_layout(2, 96, 4, 2, 4, num_classes=10).items()}
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.attn\.qkv\.weight"):
        load_official(DiT(**SIZES["test-dit"], **TINY), big)
    del big["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="missing"):
        load_official(DiT(hidden_size=96, depth=2, num_heads=4, **TINY), big)


# ------------------------------------------------------------------------------------------------
# Behaviour
# ------------------------------------------------------------------------------------------------
def test_contract_attributes_and_zero_init():
    model = DiT(**SIZES["test-dit"], **TINY)
    assert DiT.time_convention == "noise_at_0"
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes) == (4, 8, 8, 10)
    assert model.learn_sigma and not model.pos_embed.requires_grad
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros(4, 8, 8, 8))  # adaLN-Zero: the final layer starts at 0
    assert DiT(learn_sigma=False, hidden_size=64, depth=1, num_heads=4, **TINY).out_channels == 4


def test_label_dropout_uses_the_null_class_in_training_only():
    model = randomize(DiT(hidden_size=64, depth=1, num_heads=4, class_dropout_prob=1.0, **TINY))
    x, t, y = inputs(model)
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        dropped = model.train()(x, t, y)
        model.eval()
        torch.testing.assert_close(dropped, model(x, t, null))
        assert not torch.allclose(model(x, t, y), dropped)
        torch.testing.assert_close(model(x, t, None), model(x, t, null))  # y=None: unconditional


def test_bad_input_is_explained():
    model = DiT(**SIZES["test-dit"], **TINY)
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match=r"\[B, 4, 8, 8\].*\(4, 3, 8, 8\)"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match=r"\[B, 4, 8, 8\].*\(4, 4, 16, 16\)"):
        model(torch.randn(4, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"\[B, 4, 8, 8\]"):
        model(x[0], t, y)
    with pytest.raises(ValueError, match=r"\[0, 10\].*\[0, 11\]"):
        model(x, t, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match=r"\[0, 10\].*\[-1, 2\]"):
        model(x, t, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="integer class labels"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="one time per sample"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x.index_fill(0, torch.tensor([2]), float("nan")), t, y)
    with pytest.raises(ValueError, match="times containing NaN"):
        model(x, torch.tensor([0.1, float("nan"), 0.2, 0.3]), y)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT(input_size=9, patch_size=2)
    assert model(x, 0.5, y).shape == (4, 8, 8, 8)  # a scalar time is broadcast


def test_bf16_autocast_with_qk_norm_and_no_rope():
    """fp32 QK-RMSNorm outputs go back to the value dtype before attention under autocast."""
    model = randomize(DiT(hidden_size=64, depth=1, num_heads=4, use_qknorm=True, use_rmsnorm=True, **TINY))
    x, t, y = inputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_compiled_form_of_gelu_tanh_is_pytorchs_gelu(monkeypatch):
    """The x·σ(2z) form taken under torch.compile has GELU-tanh's values and gradients (run eagerly
    here with the compile flag forced on; the slow test below runs it through inductor)."""
    x = torch.linspace(-8, 8, 1001, requires_grad=True)
    want = F.gelu(x, approximate="tanh")
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = gelu_tanh(x)
    assert got.grad_fn.name() != want.grad_fn.name()  # the sigmoid form ran, not F.gelu
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "builder,options",
    [
        (DiT, SIZES["test-dit"]),
        (LightningDiT, {**LIGHTNINGDIT_SIZES["test-lightningdit"], "use_qknorm": True}),
    ],
    ids=["DiT", "LightningDiT"],
)
def test_compiled_blocks_match_eager(builder, options):
    """``compile_blocks()`` (LightningDiT's torch.compile) computes the same outputs and gradients:
    DiT's LayerNorm and GELU MLP, LightningDiT's RMSNorm, SwiGLU, RoPE and QK-norm."""
    eager = randomize(builder(**options, **TINY))
    compiled = builder(**options, **TINY)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x, t, y = inputs(eager)
    for model in (eager, compiled):
        model.eval()(x, t, y).square().mean().backward()
    torch.testing.assert_close(compiled(x, t, y), eager(x, t, y), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_every_flow_builder_loads_released_weights_by_path(tmp_path):
    """``pretrained=`` takes an official training checkpoint ({"ema", "model"}: EMA first) or our own
    FlowGenerator weights, so a released model needs no Python to load."""
    from latentforge_core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    trained = registry.generators.build("test-lightningdit")
    other = {k: torch.randn_like(v) for k, v in trained.backbone.state_dict().items()}
    torch.save({"model": other, "ema": trained.backbone.state_dict()}, tmp_path / "official.pt")
    save_checkpoint(trained.state_dict(), tmp_path / "ours.safetensors", {})
    for source in (tmp_path / "official.pt", tmp_path / "ours.safetensors"):
        loaded = registry.generators.build("test-lightningdit", pretrained=str(source))
        for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k

"""Feature selection as each seed uses it, checked against the seed's own recipe run on transformers.

The peer side re-enacts each recipe with the transformers model: RAE deletes the final LayerNorm's
affine parameters and drops the prefix tokens; DiGIT takes block L-3 through the final norm; VA-VAE
feeds the [-1, 1] image bilinearly resized, without mean/std.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from latentforge_core import registry
from latentforge_encoders import FeatureSpec, build_encoder, load_encoder
from latentforge_encoders.convert import from_hf

TOL = dict(rtol=1e-5, atol=1e-5)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
RAE_INPUT = {  # prefix tokens dropped, mean/std of the processor
    "dinov2_reg": (5, IMAGENET_MEAN, IMAGENET_STD),
    "siglip": (0, 0.5, 0.5),
    "mae": (1, IMAGENET_MEAN, IMAGENET_STD),
}


def images(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def to_map(tokens):
    side = int(tokens.shape[1] ** 0.5)
    return rearrange(tokens, "b (h w) c -> b c h w", h=side)


@pytest.mark.parametrize("family", sorted(RAE_INPUT))
def test_rae_last_layer_norm_without_affine(hf_folder, hf_run, family):
    folder, model = hf_folder(family)
    encoder = load_encoder(folder, features="rae")
    img = images()
    ours = encoder(img)
    # RAE.encode: bicubic resize to 16 tokens a side, processor mean/std, final LN affine deleted
    drop, mean, std = RAE_INPUT[family]
    x = (F.interpolate(img, size=(64, 64), mode="bicubic", align_corners=False) - mean) / std
    final_norm = model.post_layernorm if family == "siglip" else model.layernorm
    final_norm.weight, final_norm.bias = None, None
    reference = to_map(hf_run(model, family, x)[1][:, drop:])
    assert ours.shape == reference.shape == (2, 32, 16, 16) == (2, *encoder.feature_shape())
    torch.testing.assert_close(ours, reference, **TOL)
    # standardised per token: zero mean, unit variance over channels
    torch.testing.assert_close(ours.mean(1), torch.zeros(2, 16, 16), atol=1e-5, rtol=0)


def test_digit_third_to_last_block_through_final_norm(hf_folder, hf_run):
    folder, model = hf_folder("dinov2_reg", num_hidden_layers=5, image_size=64)  # native 16x16 grid
    encoder = load_encoder(folder, features="digit")
    assert encoder.layers == (2,)  # L-3 of 5 blocks
    img = images()
    x = (
        F.interpolate(img, size=(64, 64), mode="bicubic", align_corners=False) - IMAGENET_MEAN
    ) / IMAGENET_STD
    hidden = hf_run(model, "dinov2_reg", x)[0]
    with torch.no_grad():
        reference = to_map(model.layernorm(hidden[2 + 1])[:, 5:])  # block index 2, CLS + 4 registers dropped
    torch.testing.assert_close(encoder(img), reference, **TOL)


def test_vavae_signed_input_without_mean_std(hf_folder, hf_run):
    folder, model = hf_folder("dinov2", image_size=64)
    encoder = load_encoder(folder, features="vavae")
    img = images()
    signed = F.interpolate(img * 2 - 1, size=(64, 64), mode="bilinear", align_corners=False)
    reference = to_map(hf_run(model, "dinov2", signed)[1][:, 1:])  # last layer + final norm, CLS dropped
    torch.testing.assert_close(encoder(img), reference, **TOL)
    assert encoder.preprocessing.value_range == (-1.0, 1.0) and encoder.preprocessing.resize == "bilinear"


def test_intermediate_blocks_cls_and_pooled(hf_folder, hf_run):
    folder, model = hf_folder("dinov2_reg")
    encoder = load_encoder(folder)
    img = images(size=16)  # the native size: no resize
    x = (img - IMAGENET_MEAN) / IMAGENET_STD
    hidden, last = hf_run(model, "dinov2_reg", x)
    blocks = encoder.features(img, layers=(0, -1), norm="none", output="tokens")
    assert isinstance(blocks, list) and len(blocks) == 2
    torch.testing.assert_close(blocks[0], hidden[1][:, 5:], **TOL)
    torch.testing.assert_close(blocks[1], hidden[3][:, 5:], **TOL)
    torch.testing.assert_close(encoder.features(img, output="cls"), last[:, 0], **TOL)
    torch.testing.assert_close(encoder.features(img, output="pooled"), last[:, 5:].mean(1), **TOL)
    for output, shape in [("map", (32, 4, 4)), ("tokens", (16, 32)), ("cls", (32,)), ("pooled", (32,))]:
        enc = load_encoder(folder, features=FeatureSpec(output=output))
        assert enc(img).shape[1:] == enc.feature_shape() == shape


def test_siglip_has_no_cls(hf_folder):
    folder, _ = hf_folder("siglip")
    with pytest.raises(ValueError, match="no CLS token.*pooled"):
        load_encoder(folder).features(images(size=16), output="cls")


@pytest.mark.parametrize(
    ("name", "preset", "layers", "shape"),
    [
        ("dinov2-vitb14-reg", "rae", (11,), (768, 16, 16)),
        ("dinov2-vitb14-reg", "digit", (9,), (768, 16, 16)),
        ("dinov2-vitl14-reg", "digit", (21,), (1024, 16, 16)),
        ("dinov2-vitl14", "vavae", (23,), (1024, 16, 16)),
        ("siglip2-vitb16-256", "rae", (11,), (768, 16, 16)),
        ("mae-vitb16", "rae", (11,), (768, 16, 16)),
    ],
)
def test_registered_presets(name, preset, layers, shape):
    with torch.device("meta"):  # architecture only, no memory
        encoder = registry.encoders.build(name, features=preset)
    assert encoder.layers == layers and encoder.feature_shape() == shape
    assert encoder.preprocessing.input_size == 16 * encoder.patch_size


DINOV2_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


@pytest.mark.parametrize("size", sorted(DINOV2_SIZES))
def test_registered_dinov2_sizes_match_transformers(size):
    """Each table row has the parameters of the transformers model of the released config."""
    import transformers as tf

    dim, depth, heads = DINOV2_SIZES[size]
    kw = dict(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=14, image_size=518
    )
    with torch.device("meta"):
        ours = {reg: registry.encoders.build(f"dinov2-vit{size}14{reg}") for reg in ("", "-reg")}
        peers = {
            "": tf.Dinov2Model(tf.Dinov2Config(use_swiglu_ffn=size == "g", **kw)),
            "-reg": tf.Dinov2WithRegistersModel(
                tf.Dinov2WithRegistersConfig(num_register_tokens=4, use_swiglu_ffn=size == "g", **kw)
            ),
        }
    for reg, encoder in ours.items():
        expected = {k: tuple(v.shape) for k, v in from_hf(peers[reg].state_dict()).items()}
        assert {k: tuple(v.shape) for k, v in encoder.vit.state_dict().items()} == expected
    assert ours["-reg"].vit.num_prefix_tokens == 5 and ours[""].vit.pos_embed.shape[1] == 1 + 37 * 37


def test_frozen_by_default_and_gradients_reach_the_input():
    encoder = registry.encoders.build("test-vit-tiny")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and "frozen=True" in repr(encoder)
    img = images(size=32).requires_grad_()
    encoder(img).square().mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    trainable = build_encoder("test-vit-tiny", frozen=False)
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.train().training


def test_tiny_is_deterministic_and_resizes_any_input():
    a, b = registry.encoders.build("test-vit-tiny"), registry.encoders.build("test-vit-tiny")
    img = images(size=32)
    torch.testing.assert_close(a(img), b(img), rtol=0, atol=0)
    assert a(images(size=45)).shape == (2, 64, 8, 8) == (2, *a.feature_shape())
    assert build_encoder("test-vit-tiny", image_size=48)(img).shape == (2, 64, 12, 12)


@pytest.mark.parametrize("grid", [16, 32, 23])
def test_official_position_resize_reaches_the_grid(grid):
    """DINOv2's offset scale factor ((g + 0.1) / 37) must land exactly on g, never g - 1."""
    from latentforge_encoders import VisionTransformer

    vit = VisionTransformer(
        image_size=37 * 2, patch_size=2, embed_dim=8, depth=1, num_heads=2, pos_offset=0.1
    )
    pos = vit.interpolate_pos_embed(grid, grid)
    assert pos.shape == (1, 1 + grid * grid, 8)
    torch.testing.assert_close(pos[:, :1], vit.pos_embed[:, :1])  # the CLS slot is not resized
    vit.pos_offset = 0.0  # a target size instead: other sampling positions
    assert not torch.allclose(pos, vit.interpolate_pos_embed(grid, grid))

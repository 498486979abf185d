"""Checkpoint layouts: the official DINOv2 ``.pth`` layout, Hugging Face folders, our safetensors.

The official layout is built here key by key with random values; the same values, renamed to the
hub layout of transformers' DINOv2 models, are loaded by transformers itself (``from_pretrained``),
which is the reference the features are compared against.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError
from latentforge_encoders import build_encoder, load_encoder, save_encoder
from latentforge_encoders.convert import vit_config_from_hf

TOL = dict(rtol=1e-5, atol=1e-5)


def official_dinov2(dim, depth, grid, patch=4, registers=4, swiglu=False, chunks=0, seed=0):
    """A state dict in the layout of ``dinov2_vit*14[_reg4]_pretrain.pth``, random values."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, center=0.0):
        return center + 0.3 * torch.randn(*shape, generator=gen)

    sd = {
        "cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
        "norm.weight": r(dim, center=1.0), "norm.bias": r(dim),
    }  # fmt: skip
    if registers:
        sd["register_tokens"] = r(1, registers, dim)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim  # DINOv2's SwiGLUFFNFused width
    for i in range(depth):
        p = f"blocks.{i // (depth // chunks)}.{i}." if chunks else f"blocks.{i}."
        sd.update({
            p + "norm1.weight": r(dim, center=1.0), p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim), p + "ls1.gamma": r(dim),
            p + "norm2.weight": r(dim, center=1.0), p + "norm2.bias": r(dim), p + "ls2.gamma": r(dim),
        })  # fmt: skip
        if swiglu:
            sd.update({p + "mlp.w12.weight": r(2 * hidden, dim), p + "mlp.w12.bias": r(2 * hidden),
                       p + "mlp.w3.weight": r(dim, hidden), p + "mlp.w3.bias": r(dim)})  # fmt: skip
        else:
            sd.update({p + "mlp.fc1.weight": r(hidden, dim), p + "mlp.fc1.bias": r(hidden),
                       p + "mlp.fc2.weight": r(dim, hidden), p + "mlp.fc2.bias": r(dim)})  # fmt: skip
    return sd


def official_to_hub(sd):
    """Official names → the hub names of transformers' Dinov2(WithRegisters)Model checkpoints."""
    out = {
        "embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"], "layernorm.weight": sd["norm.weight"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.bias": sd["norm.bias"],
    }  # fmt: skip
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    renames = {"attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
               "ls2.gamma": "layer_scale2.lambda1", "mlp.w12": "mlp.weights_in",
               "mlp.w3": "mlp.weights_out"}  # fmt: skip
    for key, value in sd.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        prefix = f"encoder.layer.{index}."
        if rest.startswith("attn.qkv"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part
            continue
        for old, new in renames.items():
            rest = rest.replace(old, new)
        out[prefix + rest] = value
    return out


def hf_from_official(tmp_path, sd, *, dim, depth, heads, grid, registers, swiglu):
    import transformers as tf

    kw = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=4,
              image_size=4 * grid, use_swiglu_ffn=swiglu, attn_implementation="eager")  # fmt: skip
    if registers:
        config, cls = (
            tf.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw),
            tf.Dinov2WithRegistersModel,
        )
    else:
        config, cls = tf.Dinov2Config(**kw), tf.Dinov2Model
    folder = tmp_path / "hf"
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in official_to_hub(sd).items()}, folder / "model.safetensors")
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model.eval()


@pytest.mark.parametrize(
    ("registers", "swiglu", "chunks"), [(4, False, 0), (0, False, 0), (0, True, 0), (4, False, 2)]
)
def test_official_layout_round_trip(tmp_path, registers, swiglu, chunks):
    dims = dict(dim=128, depth=2, grid=4, registers=registers, swiglu=swiglu)  # head dim 64, as in DINOv2
    sd = official_dinov2(**dims, chunks=chunks)  # chunked: blocks.<chunk>.<block>.…
    peer = hf_from_official(tmp_path, official_dinov2(**dims), heads=2, **dims)  # same values, flat names
    path = tmp_path / "dinov2_vit_pretrain.pth"
    torch.save(sd, path)
    encoder = load_encoder(path)  # architecture inferred from the shapes, strict load
    assert encoder.vit.num_registers == registers and encoder.vit.config["ffn"] == (
        "swiglu" if swiglu else "mlp"
    )
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peer(pixel_values=x).last_hidden_state
        # fp32 agreement relative to the output's scale (up to ~7 here): an absolute 1e-5 failed on
        # near-zero entries for about one input in three, with either GEMM library on our side.
        scale = expected.abs().max().item()
        torch.testing.assert_close(encoder.vit(x), expected, rtol=1e-5, atol=1e-5 * scale)


def test_official_layout_into_registered_encoder(tmp_path):
    sd = official_dinov2(dim=64, depth=4, grid=8, registers=4, seed=1)
    path = tmp_path / "tiny_reg4_pretrain.pth"
    torch.save(sd, path)
    encoder = registry.encoders.build("test-vit-tiny", pretrained=str(path))
    peer = hf_from_official(tmp_path, sd, dim=64, depth=4, heads=4, grid=8, registers=4, swiglu=False)
    img = torch.rand(2, 3, 32, 32)
    x = (img - encoder.mean) / encoder.std
    with torch.no_grad():
        expected = peer(pixel_values=x).last_hidden_state[:, 5:].transpose(1, 2).reshape(2, 64, 8, 8)
    torch.testing.assert_close(encoder(img), expected, **TOL)


def timm_dinov2(name, seed=0, **kwargs):
    """timm's own DINOv2 ViT ``name`` at a tiny size, every parameter random (the peer)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in key and key.endswith("weight") else 0.3 * noise)
    return model.eval()


@pytest.mark.parametrize(
    "name", ["vit_small_patch14_dinov2", "vit_base_patch14_reg4_dinov2", "vit_giant_patch14_reg4_dinov2"]
)
def test_timm_layout_matches_timm(tmp_path, name):
    """timm's names: ``reg_token``, a ``pos_embed`` without the CLS slot (``no_embed_class``: the CLS
    token gets no position), the giant's packed SwiGLU ``mlp.fc1``/``fc2``; CLS, registers and patch
    tokens equal timm's at the native grid and, resized as timm's ``dynamic_img_size`` does, at another."""
    size = dict(embed_dim=128, depth=2, num_heads=2, img_size=56)  # head dim 64, as DINOv2's
    peer = timm_dinov2(name, **size)
    path = tmp_path / f"{name}.pth"
    torch.save(peer.state_dict(), path)
    encoder = load_encoder(path)
    registers = 4 if "reg4" in name else 0
    assert (encoder.vit.num_registers, encoder.vit.num_prefix_tokens) == (registers, 1 + registers)
    assert encoder.vit.config["ffn"] == ("swiglu" if "giant" in name else "mlp")
    assert encoder.vit.pos_antialias == bool(registers)  # timm's own names say how it resizes
    # timm's non-register models use the official names, so the file cannot say it is timm's: the
    # resize is then the caller's choice (a preset's ``pos_antialias``), set to timm's here.
    encoder.vit.pos_antialias = True
    resizing = timm_dinov2(name, dynamic_img_size=True, **size)
    resizing.load_state_dict(peer.state_dict())
    gen = torch.Generator().manual_seed(1)
    for model, side in ((peer, 56), (resizing, 84)):
        x = torch.randn(2, 3, side, side, generator=gen)
        with torch.no_grad():
            expected, got = model.forward_features(x), encoder.vit(x)
        assert got.shape == expected.shape == (2, 1 + registers + (side // 14) ** 2, 128)
        scale = expected.abs().max().item()
        torch.testing.assert_close(got[:, 0], expected[:, 0], rtol=1e-5, atol=1e-5 * scale)  # CLS
        torch.testing.assert_close(got[:, 1 + registers :], expected[:, 1 + registers :], rtol=1e-5,
                                   atol=1e-5 * scale)  # fmt: skip


def test_timm_layout_into_registered_encoder(tmp_path):
    peer = timm_dinov2("vit_base_patch14_reg4_dinov2", embed_dim=64, depth=4, num_heads=4, patch_size=4,
                       img_size=32)  # fmt: skip
    path = tmp_path / "timm_reg4.pth"
    torch.save(peer.state_dict(), path)
    encoder = registry.encoders.build("test-vit-tiny", pretrained=str(path))
    img = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = peer.forward_features((img - encoder.mean) / encoder.std)
    expected = expected[:, 5:].transpose(1, 2).reshape(2, 64, 8, 8)
    torch.testing.assert_close(encoder(img), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_hf_folder_into_registered_encoder(hf_folder, hf_run):
    folder, model = hf_folder(
        "dinov2_reg", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32
    )
    encoder = build_encoder("test-vit-tiny", pretrained=str(folder), features="rae", image_size=32)
    x = torch.rand(1, 3, 32, 32)
    last_block = hf_run(model, "dinov2_reg", (x - encoder.mean) / encoder.std)[0][-1]
    expected = torch.nn.functional.layer_norm(last_block, (64,), eps=1e-6)[:, 5:]
    torch.testing.assert_close(encoder.features(x, output="tokens"), expected, **TOL)


def test_our_format_round_trip(tmp_path):
    trained = build_encoder("test-vit-tiny", features="digit", frozen=False)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = save_encoder(trained, tmp_path / "tiny.safetensors")
    loaded = load_encoder(path)
    assert loaded.spec == trained.spec and loaded.preprocessing == trained.preprocessing
    img = torch.rand(2, 3, 37, 37)
    torch.testing.assert_close(loaded(img), trained(img), rtol=0, atol=0)
    into_registered = build_encoder("test-vit-tiny", pretrained=str(path), features="digit")
    torch.testing.assert_close(into_registered(img), trained(img), rtol=0, atol=0)
    assert not torch.equal(build_encoder("test-vit-tiny", features="digit")(img), trained(img))


def test_checkpoint_of_another_architecture_is_refused(tmp_path, hf_folder):
    siglip, _ = hf_folder("siglip")
    with pytest.raises(CheckpointError, match="another architecture than test-vit-tiny.*class_token"):
        build_encoder("test-vit-tiny", pretrained=str(siglip))
    path = tmp_path / "vit128.pth"
    torch.save(official_dinov2(dim=128, depth=2, grid=4), path)
    with pytest.raises(CheckpointError, match="embed_dim: checkpoint 128 vs test-vit-tiny 64"):
        build_encoder("test-vit-tiny", pretrained=str(path))
    extra = official_dinov2(dim=64, depth=4, grid=8)
    extra["blocks.0.attn.rope"] = torch.zeros(3)
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): blocks\.0\.attn\.rope"):
        build_encoder("test-vit-tiny", pretrained=str(path))


def test_unreadable_sources(tmp_path, hf_folder):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(tmp_path / "missing.pth")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_encoder(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_encoder(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="unsupported Hugging Face model_type 'bert'"):
        vit_config_from_hf({"model_type": "bert"})

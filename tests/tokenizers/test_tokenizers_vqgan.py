"""VQGAN: shapes, MAGE key layout (strict load), the residual-shortcut quirk, quantizer, losses, learning."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError, load_checkpoint
from latentforge_core.protocols import Tokenizer
from latentforge_tokenizers.discriminators import PatchGANDiscriminator
from latentforge_tokenizers.lpips import LPIPS
from latentforge_tokenizers.vqgan import (
    SIZES,
    ResnetBlock,
    VectorQuantizer,
    VQGANLoss,
    build_vqgan,
    tiny_vqgan,
    train_step,
    vqgan_f16_1024,
)


@contextlib.contextmanager
def one_thread():
    """Tiny convs run fastest single-threaded, and far faster than two threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def digits_16():
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)  # B 1 8 8 in [0, 1]
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    return images.expand(-1, 3, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------------
# MAGE's key layout, written out from its config (taming Encoder/Decoder as MAGE ships them)
# ------------------------------------------------------------------------------------------------
def mage_layout(ch, ch_mult, num_res_blocks, z_channels, n_embed, **_):
    """Every key of MAGE's VQModel state dict with its shape."""
    shapes = {}

    def norm(prefix, c):
        shapes[f"{prefix}.weight"] = (c,)
        shapes[f"{prefix}.bias"] = (c,)

    def resblock(prefix, c_in, c_out):
        norm(f"{prefix}.norm1", c_in)
        shapes[f"{prefix}.conv1.weight"] = (c_out, c_in, 3, 3)  # no bias
        norm(f"{prefix}.norm2", c_out)
        shapes[f"{prefix}.conv2.weight"] = (c_out, c_out, 3, 3)
        if c_in != c_out:
            shapes[f"{prefix}.nin_shortcut.weight"] = (c_out, c_out, 1, 1)  # acts on h: out → out

    levels = len(ch_mult)
    shapes["encoder.conv_in.weight"] = (ch, 3, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):  # avg-pool downsampling: no keys
        for j in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
    for name in ("block_1", "block_2"):
        resblock(f"encoder.mid.{name}", c, c)
    norm("encoder.norm_out", c)
    shapes["encoder.conv_out.weight"] = (z_channels, c, 1, 1)
    shapes["encoder.conv_out.bias"] = (z_channels,)

    shapes["decoder.conv_in.weight"] = (c, z_channels, 3, 3)
    shapes["decoder.conv_in.bias"] = (c,)
    for name in ("block_1", "block_2"):
        resblock(f"decoder.mid.{name}", c, c)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks):
            resblock(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
        if i != 0:
            shapes[f"decoder.up.{i}.upsample.conv.weight"] = (c, c, 3, 3)
            shapes[f"decoder.up.{i}.upsample.conv.bias"] = (c,)
    norm("decoder.norm_out", c)
    shapes["decoder.conv_out.weight"] = (3, c, 3, 3)
    shapes["decoder.conv_out.bias"] = (3,)
    shapes["quantize.embedding.weight"] = (n_embed, z_channels)
    return shapes


def random_state(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_mage_layout_loads_strictly(name, tmp_path):
    shapes = mage_layout(**SIZES[name])
    model = build_vqgan(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    state = random_state(shapes)
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": state}, path)  # MAGE's loader unwraps a top-level "state_dict"
    loaded = build_vqgan(name, pretrained=path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    if name == "vqgan-f16-1024":
        assert len(shapes) == 168 and shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 256, 1, 1)
        assert sum(v.numel() for v in model.parameters()) == sum(int(np.prod(s)) for s in shapes.values())


def test_mage_layout_mismatches_are_named(tmp_path):
    state = random_state(mage_layout(**SIZES["test-vqgan-tiny"]))
    model = tiny_vqgan()
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        model.load_mage(missing)
    # a standard shortcut nin(x): in → out channels, does not fit MAGE's nin(h)
    bad = dict(state)
    key = "encoder.down.2.block.0.nin_shortcut.weight"
    bad[key] = torch.randn(64, 32, 1, 1)
    with pytest.raises(CheckpointError, match="nin_shortcut"):
        model.load_mage(bad)
    with pytest.raises(CheckpointError, match="unexpected.*loss.discriminator"):
        model.load_mage({**state, "loss.discriminator.weight": torch.zeros(1)})


def test_residual_shortcut_applies_to_the_block_output():
    torch.manual_seed(0)
    block = ResnetBlock(32, 64)
    x = torch.randn(2, 32, 8, 8)

    def gn(t, norm):
        return F.group_norm(t, 32, norm.weight, norm.bias, 1e-6)

    h = F.conv2d(F.silu(gn(x, block.norm1)), block.conv1.weight, padding=1)
    h = F.conv2d(F.silu(gn(h, block.norm2)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block(x), F.conv2d(h, block.nin_shortcut.weight) + h)
    same = ResnetBlock(32, 32)
    assert not hasattr(same, "nin_shortcut")
    h = F.conv2d(F.silu(gn(x, same.norm1)), same.conv1.weight, padding=1)
    h = F.conv2d(F.silu(gn(h, same.norm2)), same.conv2.weight, padding=1)
    torch.testing.assert_close(same(x), x + h)


# ------------------------------------------------------------------------------------------------
# Shapes and the tokenizer interface
# ------------------------------------------------------------------------------------------------
def test_round_trip_shapes_and_protocol(tmp_path):
    with one_thread():
        tiny = tiny_vqgan()
        assert isinstance(tiny, Tokenizer)
        images = torch.rand(2, 3, 16, 16)
        ids = tiny.encode(images)
        assert ids.shape == (2, 4, 4) and ids.dtype == torch.int64 and tiny.latent_shape == (4, 4)
        out = tiny.decode(ids)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        recon, qloss, ids_train = tiny(images)
        assert recon.shape == images.shape and qloss.ndim == 0 and torch.equal(ids_train, ids)
        full = vqgan_f16_1024()
        assert full.vocab_size == 1024 and full.latent_shape == (16, 16)
        ids = full.encode(torch.rand(1, 3, 32, 32))  # f16: a 32 px image gives 2×2 codes
        assert ids.shape == (1, 2, 2) and full.decode(ids).shape == (1, 3, 32, 32)
    # our safetensors holds the same keys and loads back through the same path
    path = tiny.save(tmp_path / "tiny.safetensors")
    state, config = load_checkpoint(path)
    assert config["n_embed"] == 64 and set(state) == set(tiny.state_dict())
    again = tiny_vqgan(pretrained=path)
    assert torch.equal(again.encode(images), tiny.encode(images))


def test_registered_entries():
    names = registry.tokenizers.names()
    assert {"vqgan-f16-1024", "test-vqgan-tiny", "kmeans", "test-kmeans-tiny"} <= set(names)
    model = registry.tokenizers.build("test-vqgan-tiny")
    assert model.vocab_size == 64


# ------------------------------------------------------------------------------------------------
# Quantizer
# ------------------------------------------------------------------------------------------------
def test_quantizer_nearest_code_straight_through_and_legacy_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, beta=0.25)
    nn_weight = torch.randn(32, 8)
    vq.embedding.weight.data.copy_(nn_weight)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, loss, ids = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(ids.flatten(), torch.cdist(flat, nn_weight).argmin(1))
    e = nn_weight[ids].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, e)
    mse = ((z.detach() - e) ** 2).mean()
    torch.testing.assert_close(loss, mse + 0.25 * mse)  # same value; the gradients tell the terms apart
    (z_q.sum() + loss).backward()
    # straight-through: d z_q / d z = 1; the commitment term (weight 1 in the legacy form) adds 2(z − e)/N
    torch.testing.assert_close(z.grad, 1 + 2 * (z.detach() - e) / z.numel())
    # the codebook term (weight β) pulls each used code towards its inputs: 2β(e − z)/N summed per code
    step = (0.25 * 2 * (e - z.detach()) / z.numel()).permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.zeros(32, 8).index_add_(0, ids.flatten(), step)
    torch.testing.assert_close(vq.embedding.weight.grad, expected)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def test_train_step_with_lpips_and_patchgan():
    torch.manual_seed(0)
    with one_thread():
        model = tiny_vqgan()
        disc = PatchGANDiscriminator(ndf=8, n_layers=2)
        loss_fn = VQGANLoss(lpips=LPIPS(), discriminator=disc, disc_start=1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
        images = digits_16()[:8]
        before = [p.clone() for p in disc.parameters()]
        logs0 = train_step(model, loss_fn, images, opt, 0, disc_opt)  # GAN still off
        assert "g_loss" not in logs0 and "d_loss" not in logs0
        assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))
        logs1 = train_step(model, loss_fn, images, opt, 1, disc_opt)
        assert {"g_loss", "d_weight", "d_loss", "lpips", "qloss"} <= set(logs1)
        assert np.isfinite(list(logs1.values())).all() and logs1["d_weight"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))


def psnr(model, images):
    with torch.no_grad():
        mse = (model.decode(model.encode(images)) - images).square().mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.mark.slow
def test_tiny_vqgan_learns_digits():
    torch.manual_seed(0)
    images = digits_16()
    train, test = images[:1500], images[1500:]
    with one_thread():
        model = tiny_vqgan()
        loss_fn = VQGANLoss()  # L1 + codebook/commitment: LPIPS and the GAN are exercised above
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
        start = psnr(model, test)
        gen = torch.Generator().manual_seed(0)
        for step in range(300):
            train_step(model, loss_fn, train[torch.randint(0, len(train), (16,), generator=gen)], opt, step)
        end = psnr(model, test)
        codes_used = model.encode(test).unique().numel()
    print(f"held-out PSNR {start:.2f} → {end:.2f} dB, {codes_used}/64 codes used")
    assert end > start + 8.0
    assert codes_used > 8


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    model = tiny_vqgan()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 4, 4), -1))
    with pytest.raises(TypeError, match="integer"):
        model.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        model.decode(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.rand(1, 3, 18, 18))
    with pytest.raises(ValueError, match="unknown VQGAN"):
        build_vqgan("vqgan-f8")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_vqgan("test-vqgan-tiny", ch=48)

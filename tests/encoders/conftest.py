"""Tiny Hugging Face vision models with random weights, saved as model folders (the peer)."""

from __future__ import annotations

import pytest
import torch

# tiny architectures: 32 wide, 3 blocks, 2 heads, patch 4
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, patch_size=4, image_size=16)


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of ``family`` with every parameter drawn at random (eager attention)."""
    import transformers as tf

    cfg = {**TINY, **overrides, "attn_implementation": "eager"}
    mlp = 3 * cfg["hidden_size"]
    if family.startswith("dinov2"):
        if family == "dinov2_reg":
            model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=4, **cfg))
        else:
            model = tf.Dinov2Model(tf.Dinov2Config(use_swiglu_ffn=family == "dinov2_swiglu", **cfg))
    elif family == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=mlp, **cfg))
    elif family == "mae":
        model = tf.ViTMAEModel(tf.ViTMAEConfig(intermediate_size=mlp, mask_ratio=0.0, **cfg))
    else:
        raise ValueError(family)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_norm_weight else 0.3 * noise)
    return model.eval()


def run_hf(model, family: str, x: torch.Tensor):
    """The peer's forward: every hidden state ([0] = embeddings, [i+1] = block i) and the last one."""
    kwargs = {"output_hidden_states": True}
    native = model.config.image_size
    if family in ("siglip", "mae"):
        kwargs["interpolate_pos_encoding"] = tuple(x.shape[-2:]) != (native, native)
    if family == "mae":  # identity "shuffle": RAE's way of running the MAE encoder unmasked
        n = (x.shape[-2] // model.config.patch_size) * (x.shape[-1] // model.config.patch_size)
        kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(len(x), n)
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    return out.hidden_states, out.last_hidden_state


@pytest.fixture
def hf_folder(tmp_path):
    """``hf_folder(family, **config) -> (folder, model)``: the model saved with ``save_pretrained``."""

    def make(family: str, seed: int = 0, **overrides):
        model = make_hf_model(family, seed, **overrides)
        folder = tmp_path / f"{family}-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture
def hf_model():
    """``hf_model(family, seed=0, **config)``: a tiny transformers model with random weights."""
    return make_hf_model


@pytest.fixture
def hf_run():
    """``hf_run(model, family, x) -> (hidden_states, last_hidden_state)``."""
    return run_hf

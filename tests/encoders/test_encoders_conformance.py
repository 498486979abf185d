"""Our ViT against Hugging Face transformers on identical random weights (fp32, 1e-5).

Each family's tiny transformers model (eager attention) is saved with ``save_pretrained`` (the hub
layout) and loaded through our converter; its in-memory transformers-5 state dict is converted too.
Both the last hidden state and every intermediate block must agree, at the native resolution and at
another one (position embeddings resized: bicubic, antialiased for the registers model).
"""

from __future__ import annotations

import functools

import pytest
import torch

from latentforge_core import attention
from latentforge_core.checkpoint import load_into
from latentforge_encoders import VisionTransformer, load_encoder
from latentforge_encoders.convert import from_hf, vit_config_from_hf

TOL = dict(rtol=1e-5, atol=1e-5)
FAMILIES = ("dinov2", "dinov2_swiglu", "dinov2_reg", "siglip", "mae")


def ours_run(vit: VisionTransformer, x: torch.Tensor):
    with torch.no_grad():
        blocks = vit.forward_blocks(x, range(vit.depth))
        return blocks, vit.norm(blocks[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_from_saved_folder(hf_folder, hf_run, family):
    folder, model = hf_folder(family)
    vit = load_encoder(folder).vit
    for size in (16, 24, 20):  # native 4x4 grid, then resized position embeddings (6x6, 5x5)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        hf_hidden, hf_last = hf_run(model, family, x)
        blocks, last = ours_run(vit, x)
        assert last.shape == hf_last.shape == (2, (size // 4) ** 2 + vit.num_prefix_tokens, 32)
        torch.testing.assert_close(last, hf_last, **TOL)
        for i in range(vit.depth):  # every block (hidden_states[0] is the embedding output)
            torch.testing.assert_close(blocks[i], hf_hidden[i + 1], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_from_in_memory_names(hf_model, hf_run, family):
    """transformers 5 renames modules in memory (q_proj, o_proj, gate_proj/up_proj): those load too."""
    model = hf_model(family, seed=3)
    vit = VisionTransformer(**vit_config_from_hf(model.config.to_dict()))
    load_into(vit, from_hf(model.state_dict()), strict=True)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    hf_hidden, hf_last = hf_run(model, family, x)
    blocks, last = ours_run(vit, x)
    torch.testing.assert_close(last, hf_last, **TOL)
    torch.testing.assert_close(blocks[1], hf_hidden[2], **TOL)


def test_attention_backends_agree(hf_folder, monkeypatch):
    """SDPA (what runs by default) against the explicit math path of core's attention."""
    import latentforge_encoders.vit as vit_module

    folder, _ = hf_folder("dinov2_reg")
    vit = load_encoder(folder).vit
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    reference = ours_run(vit, x)[1]
    monkeypatch.setattr(vit_module, "attention", functools.partial(attention, backend="math"))
    torch.testing.assert_close(ours_run(vit, x)[1], reference, **TOL)


@pytest.mark.parametrize("wrapper", ["SiglipModel", "ViTMAEForPreTraining", "Dinov2ForImageClassification"])
def test_full_checkpoints_keep_only_the_vision_trunk(tmp_path, hf_run, wrapper):
    """Hub checkpoints often hold more than the trunk (text tower, MAE decoder, classifier)."""
    import transformers as tf

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if wrapper == "SiglipModel":
        text = dict(tiny, vocab_size=50, max_position_embeddings=8)
        config = tf.SiglipConfig(text_config=text, vision_config=dict(tiny, patch_size=4, image_size=16))
        family, trunk_of = "siglip", lambda m: m.vision_model
    elif wrapper == "ViTMAEForPreTraining":
        config = tf.ViTMAEConfig(**tiny, patch_size=4, image_size=16, mask_ratio=0.0, decoder_hidden_size=16,
                                 decoder_num_hidden_layers=1, decoder_intermediate_size=32)  # fmt: skip
        family, trunk_of = "mae", lambda m: m.vit
    else:
        config = tf.Dinov2Config(**tiny, patch_size=4, image_size=16, num_labels=3)
        family, trunk_of = "dinov2", lambda m: m.dinov2
    model = getattr(tf, wrapper)(config).eval()
    model.save_pretrained(tmp_path)
    vit = load_encoder(tmp_path).vit
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    hf_hidden, hf_last = hf_run(trunk_of(model), family, x)
    blocks, last = ours_run(vit, x)
    torch.testing.assert_close(last, hf_last, **TOL)
    torch.testing.assert_close(blocks[0], hf_hidden[1], **TOL)

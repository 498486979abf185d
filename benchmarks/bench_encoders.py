"""Encoder throughput at native resolution: our ViT vs the transformers model, same weights, same input.

Full size: ViT-B of each family, batch 32 (DINOv2-B/14 with registers at 224 px, its position grid
resized from 518 px; SigLIP2-B/16 at 256 px; MAE-B/16 at 224 px), fp32 on CPU, bf16 autocast on
CUDA.  The tiny run (``full`` False) uses 2-block, 64-wide models on 32 px images.
"""

from __future__ import annotations

import pytest
import torch

from latentforge_core.checkpoint import load_into
from latentforge_core.device import autocast
from latentforge_encoders import VisionTransformer
from latentforge_encoders.convert import from_hf, vit_config_from_hf

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {  # name: (transformers model, its config at full size, input size at full size)
    "dinov2-vitb14-reg": (
        "Dinov2WithRegistersModel", dict(patch_size=14, image_size=518, num_register_tokens=4), 224,
    ),
    "siglip2-vitb16-256": (
        "SiglipVisionModel", dict(patch_size=16, image_size=256, intermediate_size=3072), 256,
    ),
    "mae-vitb16": (
        "ViTMAEModel", dict(patch_size=16, image_size=224, intermediate_size=3072, mask_ratio=0.0), 224,
    ),
}  # fmt: skip


def build_peer(family: str, full: bool):
    import transformers as tf

    cls_name, extra, size = FAMILIES[family]
    cls = getattr(tf, cls_name)
    config_cls = getattr(tf, cls_name.replace("Model", "Config"))
    if not full:
        extra = {**extra, "patch_size": 4, "image_size": 32}
        extra.update({"intermediate_size": 256} if "intermediate_size" in extra else {})
        size = 32
    config = config_cls(**(BASE if full else TINY), **extra)
    return cls(config).eval(), size


def peer_call(model, family: str, x: torch.Tensor):
    if family == "mae-vitb16":  # unmasked, unshuffled
        n = (x.shape[-1] // model.config.patch_size) ** 2
        return model(pixel_values=x, noise=torch.arange(n, device=x.device).float().expand(len(x), n))
    return model(pixel_values=x)


@pytest.mark.headline
@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encoder_images_per_second(measure, full, device, family, impl):
    peer, size = build_peer(family, full)
    ours = VisionTransformer(**vit_config_from_hf(peer.config.to_dict()))
    batch = 32 if full else 2
    x = torch.randn(batch, 3, size, size, device=device)
    if impl == "ours":
        load_into(ours, from_hf(peer.state_dict()))
        call = ours.to(device).eval()
    else:
        peer.to(device)

        def call(x):
            return peer_call(peer, family, x).last_hidden_state

    def run():
        with torch.inference_mode(), autocast(device):
            return call(x)

    tokens = measure(
        run, group=f"encoder-{family}-b{batch}", impl=impl, items=batch, unit="images/s",
        flops=batch * ours.flops(size, size),
    )  # fmt: skip
    assert tokens.shape == (batch, ours.num_prefix_tokens + (size // ours.patch_size) ** 2, ours.embed_dim)

"""The registered encoders: one builder per named size, from one plain table.

Every builder takes ``pretrained`` (``None`` = random weights; a local file or folder in our
safetensors format, the official DINOv2 ``.pth`` layout, or a Hugging Face model folder; ``"hf"``
for the entry's default hub repository or ``"hf:<repo>"``, online only), ``features`` (a preset
name or a ``FeatureSpec``), ``frozen``, ``image_size`` (the resolution the encoder runs at; the
learned position grid is resized to it) and ``check_finite``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from latentforge_core.errors import InputError
from latentforge_core.protocols import Preprocessing
from latentforge_encoders.convert import load_weights
from latentforge_encoders.encoder import FeatureSpec, FrozenEncoder, Preset, apply_preset, resolve_preset
from latentforge_encoders.vit import VisionTransformer

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

DINOV2 = dict(image_size=518, patch_size=14, layerscale_init=1e-5, norm_eps=1e-6)
DINOV2_INPUT = Preprocessing(input_size=224, resize="bicubic", **IMAGENET)


#################################################################################
#                                 Encoder sizes                                 #
#################################################################################
# Registry name -> the VisionTransformer keyword arguments of that encoder, plus its published
# settings under three keys that are not the ViT's: ``preprocessing`` (its input handling),
# ``hf_repo`` (the default hub repository of ``pretrained="hf"``; absent for test models) and
# ``seed`` (a fixed random init for test models, so every process builds the same weights).
SETTINGS = ("preprocessing", "hf_repo", "seed")


def _dinov2(dim: int, depth: int, heads: int, size: str, registers: bool, **extra) -> dict:
    # Hugging Face's registers model resizes position embeddings with antialiasing, its plain one without.
    repo = f"facebook/dinov2-with-registers-{size}" if registers else f"facebook/dinov2-{size}"
    return dict(DINOV2, embed_dim=dim, depth=depth, num_heads=heads, num_registers=4 if registers else 0,
                pos_antialias=registers, **extra, preprocessing=DINOV2_INPUT, hf_repo=repo)  # fmt: skip


SIZES: dict[str, dict] = {
    "dinov2-vits14": _dinov2(384, 12, 6, "small", False),
    "dinov2-vits14-reg": _dinov2(384, 12, 6, "small", True),
    "dinov2-vitb14": _dinov2(768, 12, 12, "base", False),
    "dinov2-vitb14-reg": _dinov2(768, 12, 12, "base", True),
    "dinov2-vitl14": _dinov2(1024, 24, 16, "large", False),
    "dinov2-vitl14-reg": _dinov2(1024, 24, 16, "large", True),
    "dinov2-vitg14": _dinov2(1536, 40, 24, "giant", False, ffn="swiglu"),
    "dinov2-vitg14-reg": _dinov2(1536, 40, 24, "giant", True, ffn="swiglu"),
    "siglip2-vitb16-256": dict(
        image_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False,
        act="gelu_tanh", norm_eps=1e-6,
        preprocessing=Preprocessing(input_size=256, resize="bilinear", **HALF),
        hf_repo="google/siglip2-base-patch16-256",
    ),
    "mae-vitb16": dict(
        image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, norm_eps=1e-12,
        preprocessing=Preprocessing(input_size=224, resize="bicubic", **IMAGENET),
        hf_repo="facebook/vit-mae-base",
    ),
    # Tiny encoder for tests and CPU demos (random weights, seed 0).
    "test-vit-tiny": dict(
        image_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_registers=4,
        layerscale_init=1.0, norm_eps=1e-6,
        preprocessing=Preprocessing(input_size=32, resize="bicubic", **IMAGENET),
        seed=0,
    ),
}  # fmt: skip


def build_encoder(
    name: str,
    pretrained: str | None = None,
    features: str | FeatureSpec | Preset | None = None,
    frozen: bool = True,
    image_size: int | None = None,
    check_finite: bool = False,
    **vit_overrides: Any,
) -> FrozenEncoder:
    """Build the encoder ``name`` of the table (see the module docstring for the arguments)."""
    if name not in SIZES:
        raise InputError(f"unknown encoder {name!r}; expected one of {sorted(SIZES)}")
    arch = {k: v for k, v in SIZES[name].items() if k not in SETTINGS}
    preprocessing, hf_repo, seed = (SIZES[name].get(k) for k in SETTINGS)
    vit = VisionTransformer(**{**arch, **vit_overrides})
    if seed is not None:
        vit.initialize_weights(torch.Generator().manual_seed(seed))
    if pretrained is not None:
        source = f"hf:{hf_repo}" if pretrained == "hf" and hf_repo else pretrained
        load_weights(vit, source, what=name)
    preprocessing = apply_preset(vit, preprocessing, preset := resolve_preset(features))
    if image_size is not None:
        if image_size % vit.patch_size:
            raise InputError(
                f"image_size {image_size} is not a multiple of {name}'s patch size {vit.patch_size}"
            )
        preprocessing = attrs.evolve(preprocessing, input_size=image_size)
    return FrozenEncoder(vit, preprocessing, preset.spec, frozen=frozen, check_finite=check_finite, name=name)


#################################################################################
#                                 Named builders                                #
#################################################################################


def dinov2_vits14(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vits14", **kw)


def dinov2_vits14_reg(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vits14-reg", **kw)


def dinov2_vitb14(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vitb14", **kw)


def dinov2_vitb14_reg(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vitb14-reg", **kw)


def dinov2_vitl14(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vitl14", **kw)


def dinov2_vitl14_reg(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vitl14-reg", **kw)


def dinov2_vitg14(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vitg14", **kw)


def dinov2_vitg14_reg(**kw) -> FrozenEncoder:
    return build_encoder("dinov2-vitg14-reg", **kw)


def siglip2_vitb16_256(**kw) -> FrozenEncoder:
    return build_encoder("siglip2-vitb16-256", **kw)


def mae_vitb16(**kw) -> FrozenEncoder:
    return build_encoder("mae-vitb16", **kw)


def tiny_vit(**kw) -> FrozenEncoder:
    """Random weights (seed 0): image 32, patch 4, dim 64, depth 4, heads 4, 4 registers."""
    return build_encoder("test-vit-tiny", **kw)

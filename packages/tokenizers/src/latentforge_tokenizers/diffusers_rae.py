"""RAE ↔ diffusers ``AutoencoderRAE``, both ways, and the ``diffusers-rae`` tokenizer.

diffusers' ``AutoencoderRAE`` holds the same three parts as our :class:`~latentforge_tokenizers.rae.RAE`:

* a frozen transformers encoder built from four numbers (type, width, patch, depth): a
  ``Dinov2WithRegistersModel`` (4 registers, LayerScale, 518-px position grid), a ``ViTMAEModel``
  (224-px grid, MLP width 3072) or a ``SiglipVisionModel``, always with 64-wide heads and its final
  LayerNorm stripped of its affine, which is our ``features="rae"`` latent (last block, LayerNorm
  without affine, patch tokens as a map).  Our ViT maps onto the first two when its settings are the
  ones diffusers fixes; any other is refused naming the setting.  SigLIP2 is refused: diffusers
  0.42's ``_build_encoder`` reaches for ``SiglipVisionModel.vision_model``, which transformers 5
  no longer has, so that model cannot be built at all.  The encoder's final-norm affine (unused by an
  RAE) has no place in diffusers and comes back as ones/zeros;
* the MAE-style ViT decoder, key for key but for the attention's names (``query``/``key``/``value``/
  ``output.dense`` ↔ ``to_q``/``to_k``/``to_v``/``to_out.0``), and its sin-cos table, a
  non-persistent buffer there, copied across so outputs agree exactly.  diffusers rebuilds that
  table on loading with positions scaled by 16 / grid (``base_size=16``), which is MAE's table only
  for a 16×16 token grid: a save_pretrained folder of another grid decodes differently (warned);
* latent normalisation: diffusers computes ``(z − mean) / (std + 1e-5) · scaling_factor``, we
  ``(z − mean) / sqrt(var + eps)``; the conversion solves one for the other (no statistics become
  ``mean = 0, std = 1 − 1e-5``, diffusers' identity).

Images are [0, 1] on both sides; noise τ carries over (diffusers draws σ ~ τ·U(0, 1), our ``"code"``
law).  diffusers is imported lazily; without it every entry point raises MissingDependencyError.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from latentforge_core.checkpoint import load_into
from latentforge_core.errors import InputError, InputTypeError, UnsupportedError
from latentforge_core.protocols import Preprocessing
from latentforge_encoders.convert import HF_DROPPED, HF_RENAMES, from_hf
from latentforge_encoders.encoder import FeatureSpec, FrozenEncoder
from latentforge_encoders.vit import VisionTransformer
from latentforge_tokenizers.diffusers_vae import _diffusers, chosen_stats, diffusers_model
from latentforge_tokenizers.rae import RAE, RAEDecoder
from latentforge_tokenizers.stats import LatentStats

log = logging.getLogger("latentforge")

SUPPORTED_CLASS = "AutoencoderRAE"
STD_OFFSET = 1e-5  # diffusers divides by (latents_std + 1e-5)
HEAD_DIM = 64  # diffusers builds every encoder with hidden_size // 64 heads
DECODER_EPS = 1e-12  # diffusers' RAEDecoder LayerNorm epsilon (not configurable)

# encoder_type -> the VisionTransformer settings diffusers' _build_encoder fixes; ``mlp`` is the MLP
# width (a factor of the width, or transformers' default 3072), ``prefix`` the leading key of the
# transformers model's state dict
ENCODER_TYPES: dict[str, dict[str, Any]] = {
    "dinov2": dict(image_size=518, class_token=True, num_registers=4, layerscale=True, act="gelu",
                   norm_eps=1e-6, mlp=("ratio", 4), pos_antialias=True),
    "mae": dict(image_size=224, class_token=True, num_registers=0, layerscale=False, act="gelu",
                norm_eps=1e-12, mlp=("fixed", 3072), pos_antialias=False),
}  # fmt: skip
RAE_SPEC = FeatureSpec((-1,), "no_affine", "map")


#################################################################################
#                                Encoder mapping                                #
#################################################################################


def _mlp_width(kind: str, dim: int) -> int:
    how, value = ENCODER_TYPES[kind]["mlp"]
    return value * dim if how == "ratio" else value


def _type_mismatches(kind: str, vit: VisionTransformer) -> list[str]:
    """The settings of ``vit`` that differ from what diffusers builds for ``encoder_type=kind``."""
    fixed, cfg = ENCODER_TYPES[kind], vit.config
    want = dict(
        image_size=fixed["image_size"] // vit.patch_size * vit.patch_size,  # ⌊size / patch⌋ tokens a side
        class_token=fixed["class_token"],
        num_registers=fixed["num_registers"], layerscale=fixed["layerscale"], act=fixed["act"],
        norm_eps=fixed["norm_eps"], ffn="mlp",
        qkv_bias=True, in_chans=3, num_heads=cfg["embed_dim"] // HEAD_DIM,
        mlp_hidden_dim=_mlp_width(kind, cfg["embed_dim"]),
    )  # fmt: skip
    have = {
        **cfg,
        "image_size": vit.grid_size * vit.patch_size,
        "layerscale": cfg["layerscale_init"] is not None,
    }
    out = [f"{k}={have[k]!r} (diffusers: {v!r})" for k, v in want.items() if have[k] != v]
    if cfg["embed_dim"] % HEAD_DIM:
        out.append(f"embed_dim={cfg['embed_dim']} (diffusers: a multiple of {HEAD_DIM}, 64-wide heads)")
    return out


def _encoder_type(encoder: FrozenEncoder) -> str:
    """diffusers' ``encoder_type`` for our frozen encoder, or UnsupportedError naming what differs."""
    if not isinstance(encoder, FrozenEncoder):
        raise UnsupportedError(
            f"an RAE encoder of type {type(encoder).__name__} has no diffusers AutoencoderRAE counterpart; "
            "expected a FrozenEncoder (a registered ViT)"
        )
    vit, pre = encoder.vit, encoder.preprocessing
    problems = []
    if encoder.layers != (vit.depth - 1,) or encoder.spec.norm != "no_affine" or encoder.spec.output != "map":
        problems.append(
            f"features {encoder.spec} (diffusers: the last block, LayerNorm without affine, a map)"
        )
    if pre.resize != "bicubic" or tuple(pre.value_range) != (0.0, 1.0):
        problems.append(
            f"input handling resize={pre.resize!r}, value_range={pre.value_range} (diffusers: bicubic "
            "resize of [0, 1] images, then its mean/std)"
        )
    if vit.pos_offset:
        problems.append(f"pos_offset={vit.pos_offset} (diffusers: a plain resize to the token grid)")
    found = {kind: _type_mismatches(kind, vit) for kind in ENCODER_TYPES}
    kind = min(found, key=lambda k: len(found[k]))
    grid = pre.input_size // vit.patch_size
    if grid != vit.grid_size and vit.pos_antialias != ENCODER_TYPES[kind]["pos_antialias"]:
        found[kind].append(
            f"pos_antialias={vit.pos_antialias} at a {grid}×{grid} grid (diffusers' {kind}: "
            f"{ENCODER_TYPES[kind]['pos_antialias']})"
        )
    if problems or found[kind]:
        detail = "; ".join(problems + found[kind])
        raise UnsupportedError(
            f"RAE encoder {encoder.name!r} cannot be expressed by diffusers' AutoencoderRAE, whose encoders "
            f"are {sorted(ENCODER_TYPES)} with fixed settings (closest: {kind!r}): {detail}. SigLIP2 "
            "encoders are not converted (diffusers 0.42 cannot build them with transformers 5)"
        )
    return kind


def _hf_name(key: str) -> str:
    """A transformers encoder key in our ViT's names (q/k/v still separate)."""
    for pattern, repl in HF_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


_QKV = re.compile(r"^(blocks\.\d+)\.attn\.([qkv])\.(weight|bias)$")


def _encoder_to_hf(vit: VisionTransformer, theirs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT's tensors under the keys of the transformers encoder ``theirs`` (its own state dict);
    keys that are not part of the trunk (DINOv2's mask token) keep their values."""
    ours, out = vit.state_dict(), {}
    for key, value in theirs.items():
        if HF_DROPPED.match(key):
            out[key] = value
            continue
        name = _hf_name(key)
        qkv = _QKV.match(name)
        if qkv:
            block, which, kind = qkv.groups()
            out[key] = ours[f"{block}.attn.qkv.{kind}"].chunk(3, dim=0)["qkv".index(which)]
        elif name not in ours:
            raise UnsupportedError(f"transformers encoder key {key!r} has no counterpart in our ViT")
        else:
            out[key] = ours[name].reshape(value.shape)
    return out


#################################################################################
#                                Decoder mapping                                #
#################################################################################

_DECODER = {
    "attention.attention.query": "attention.to_q",
    "attention.attention.key": "attention.to_k",
    "attention.attention.value": "attention.to_v",
    "attention.output.dense": "attention.to_out.0",
}


def _decoder_key(ours: str) -> str:
    for old, new in _DECODER.items():
        ours = ours.replace(f".{old}.", f".{new}.")
    return ours


def _decoder_config(decoder: RAEDecoder) -> dict[str, int]:
    layer = decoder.decoder_layers[0]
    if layer.layernorm_before.eps != DECODER_EPS:
        raise UnsupportedError(
            f"RAE decoder LayerNorm eps={layer.layernorm_before.eps}: diffusers' RAEDecoder fixes "
            f"{DECODER_EPS}"
        )
    return dict(
        decoder_hidden_size=decoder.decoder_embed.out_features,
        decoder_num_hidden_layers=len(decoder.decoder_layers),
        decoder_num_attention_heads=layer.num_heads,
        decoder_intermediate_size=layer.intermediate.dense.out_features,
        patch_size=decoder.patch_size,
    )


#################################################################################
#                              Latent normalisation                             #
#################################################################################


def _stats_to_diffusers(stats: LatentStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_mean, latents_std) with ``(z − mean) / (std + 1e-5)`` equal to our normalisation."""
    if stats is None:
        return torch.zeros(1), torch.ones(1) - STD_OFFSET
    std = torch.sqrt(stats.var.double() + stats.eps) - STD_OFFSET
    mean = torch.zeros_like(std) if stats.mean is None else stats.mean.double()
    return mean.float(), std.float()


def stats_from_diffusers(vae: Any, latent_shape: tuple[int, int, int]) -> LatentStats | None:
    """Our statistics from an AutoencoderRAE's ``_latents_mean``/``_latents_std`` buffers and
    ``scaling_factor`` (None when they normalise nothing)."""
    scale = float(vae.config.scaling_factor or 1.0)
    if not scale > 0:
        raise InputError(f"diffusers AutoencoderRAE scaling_factor={scale} must be a positive number")
    c = latent_shape[0]
    tensors = {}
    for name in ("_latents_mean", "_latents_std"):
        t = getattr(vae, name).detach().to(device="cpu", dtype=torch.float64)
        if t.numel() == 1:
            t = t.reshape(1, 1, 1).expand(c, 1, 1)
        elif t.numel() == c:
            t = t.reshape(c, 1, 1)
        elif t.numel() == c * latent_shape[1] * latent_shape[2]:
            t = t.reshape(latent_shape)
        else:
            raise InputError(
                f"diffusers AutoencoderRAE {name[1:]} of shape {tuple(t.shape)} fits latents "
                f"{latent_shape} neither per channel nor per element"
            )
        tensors[name] = t
    mean, std = tensors["_latents_mean"], (tensors["_latents_std"] + STD_OFFSET) / scale
    if not bool((std > 0).all()):
        raise InputError("diffusers AutoencoderRAE latents_std + 1e-5 must be positive")
    if bool((mean == 0).all()) and bool(((std - 1).abs() < 1e-7).all()):
        return None
    if mean.shape != std.shape:
        mean, std = torch.broadcast_tensors(mean, std)
    return LatentStats(std**2, None if bool((mean == 0).all()) else mean.contiguous())


#################################################################################
#                                 Ours → diffusers                              #
#################################################################################


def rae_to_diffusers(model: RAE):
    """Our RAE as a diffusers ``AutoencoderRAE`` with the same weights, statistics and noise τ, in
    our model's train/eval mode, fp32 on the CPU.  UnsupportedError names any setting of the encoder
    or decoder that diffusers cannot express."""
    if not isinstance(model, RAE):
        raise InputTypeError(f"rae_to_diffusers expects an RAE, got {type(model).__name__}")
    diffusers = _diffusers()
    encoder, decoder = model.encoder, model.decoder
    kind = _encoder_type(encoder)
    if model.noise_law != "code" and model.noise_tau > 0:
        log.warning(
            "RAE noise_law=%r has no diffusers setting: AutoencoderRAE draws σ ~ τ·U(0, 1) ('code') in "
            "training (inference is unaffected)",
            model.noise_law,
        )
    mean, std = _stats_to_diffusers(model.stats)
    pre = encoder.preprocessing
    vae = diffusers.AutoencoderRAE(
        encoder_type=kind,
        encoder_hidden_size=encoder.embed_dim,
        encoder_patch_size=encoder.patch_size,
        encoder_num_hidden_layers=encoder.depth,
        encoder_input_size=pre.input_size,
        num_channels=3,
        encoder_norm_mean=list(pre.mean),
        encoder_norm_std=list(pre.std),
        latents_mean=mean,
        latents_std=std,
        noise_tau=model.noise_tau,
        scaling_factor=1.0,
        **_decoder_config(decoder),
    )
    theirs = vae.state_dict()
    sd = {f"encoder.{k}": v for k, v in _encoder_to_hf(encoder.vit, _strip(theirs, "encoder.")).items()}
    sd |= {
        f"decoder.{_decoder_key(k)}": v for k, v in decoder.state_dict().items() if k != "decoder_pos_embed"
    }
    sd |= dict(
        encoder_mean=vae.encoder_mean, encoder_std=vae.encoder_std, _latents_mean=mean, _latents_std=std
    )
    load_into(vae, {k: v.detach().cpu().float() for k, v in sd.items()})
    rebuilt = vae.decoder.decoder_pos_embed
    if not torch.allclose(rebuilt, decoder.decoder_pos_embed.cpu().float(), atol=1e-6):
        log.warning(
            "diffusers' AutoencoderRAE rebuilds its decoder position table on loading, with sin-cos "
            "positions scaled by 16 / grid: for this %d×%d token grid that is not MAE's table, so the "
            "converted model is exact in memory but a save_pretrained folder of it decodes differently "
            "(a 16×16 grid, every released RAE's, saves exactly)",
            decoder.grid,
            decoder.grid,
        )
    rebuilt.copy_(decoder.decoder_pos_embed)
    return vae.train(model.training)


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


#################################################################################
#                                 diffusers → ours                              #
#################################################################################


def rae_from_diffusers(vae: Any, *, stats: Any = "model", subfolder: str | None = None) -> RAE:
    """A diffusers ``AutoencoderRAE`` (a model, a ``save_pretrained`` folder or ``hf:<org>/<repo>``)
    as our RAE, fp32 on the CPU, in eval mode, with the same weights and noise τ.

    ``stats``: ``"model"`` (its latents mean/std and scaling factor as :class:`LatentStats`, none
    when they normalise nothing), a statistics file (``stat.pt`` or ours), a LatentStats, or None."""
    vae = diffusers_model(vae, SUPPORTED_CLASS, "rae_from_diffusers", subfolder=subfolder)
    cfg = vae.config
    kind = cfg.encoder_type
    if kind not in ENCODER_TYPES:
        raise UnsupportedError(
            f"diffusers AutoencoderRAE encoder_type={kind!r} is not converted; expected one of "
            f"{sorted(ENCODER_TYPES)} (SigLIP2: diffusers 0.42 cannot build it with transformers 5)"
        )
    if not cfg.reshape_to_2d or cfg.num_channels != 3:
        raise UnsupportedError(
            f"diffusers AutoencoderRAE with reshape_to_2d={cfg.reshape_to_2d}, "
            f"num_channels={cfg.num_channels}: ours has latent maps [B, C, h, w] of RGB images"
        )
    fixed, dim = ENCODER_TYPES[kind], int(cfg.encoder_hidden_size)
    vit = VisionTransformer(
        image_size=fixed["image_size"] // cfg.encoder_patch_size * cfg.encoder_patch_size,
        patch_size=cfg.encoder_patch_size, embed_dim=dim, depth=cfg.encoder_num_hidden_layers,
        num_heads=dim // HEAD_DIM, mlp_hidden_dim=_mlp_width(kind, dim),
        num_registers=fixed["num_registers"], class_token=fixed["class_token"],
        layerscale_init=1.0 if fixed["layerscale"] else None, act=fixed["act"], norm_eps=fixed["norm_eps"],
        pos_antialias=fixed["pos_antialias"],
    )  # fmt: skip
    enc_sd = from_hf(_strip(vae.state_dict(), "encoder."))
    enc_sd |= {
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }  # unused: RAE's norm has no affine
    load_into(vit, {k: v.detach().cpu().float() for k, v in enc_sd.items()})
    mean, std = (vae.encoder_mean.flatten().tolist(), vae.encoder_std.flatten().tolist())
    pre = Preprocessing(input_size=vae.encoder_input_size, resize="bicubic", mean=tuple(mean), std=tuple(std))
    encoder = FrozenEncoder(vit, pre, RAE_SPEC, name=f"diffusers-{kind}")
    grid = vae.encoder_input_size // cfg.encoder_patch_size
    decoder = RAEDecoder(
        latent_dim=dim, hidden_size=cfg.decoder_hidden_size, depth=cfg.decoder_num_hidden_layers,
        num_heads=cfg.decoder_num_attention_heads, mlp_dim=cfg.decoder_intermediate_size,
        patch_size=cfg.patch_size, num_patches=grid * grid, eps=DECODER_EPS,
    )  # fmt: skip
    theirs = _strip(vae.state_dict(), "decoder.")
    dec_sd = {k: theirs[_decoder_key(k)] for k in decoder.state_dict() if k != "decoder_pos_embed"}
    dec_sd["decoder_pos_embed"] = vae.decoder.decoder_pos_embed
    load_into(decoder, {k: v.detach().cpu().float() for k, v in dec_sd.items()})
    config = dict(encoder=f"diffusers-{kind}", image_size=decoder.image_size, noise_tau=float(cfg.noise_tau))
    model = RAE(encoder, decoder, noise_tau=float(cfg.noise_tau), noise_law="code", config=config)
    model.set_stats(chosen_stats(stats, "model", lambda: stats_from_diffusers(vae, model.latent_shape)))
    return model.eval()


#################################################################################
#                                  Registry builder                             #
#################################################################################


def diffusers_rae(
    *, pretrained: str | os.PathLike | None = None, stats: Any = "model", subfolder: str | None = None
) -> RAE:
    """The ``diffusers-rae`` tokenizer: a diffusers ``AutoencoderRAE`` folder or ``hf:<org>/<repo>``
    converted to our RAE, so every recipe that takes an RAE takes it; ``stats`` as in
    :func:`rae_from_diffusers`."""
    if pretrained is None:
        raise InputError(
            "diffusers-rae needs pretrained=<a diffusers AutoencoderRAE folder or 'hf:<org>/<repo>'>"
        )
    return rae_from_diffusers(pretrained, stats=stats, subfolder=subfolder)

"""Our MAGE f16 VQGAN ↔ diffusers ``VQModel``, and the ``diffusers-vqmodel`` tokenizer.

No ``VQModel`` config has our VQGAN's layers, but every one of them is a special case of a
``VQModel`` layer, so ours converts exactly into a ``VQModel`` with these weights:

* MAGE's width-changing residual block computes ``nin(h) + h`` with h = conv2(…) (the shortcut reads
  the block's output, not its input): a 1×1 conv after a 3×3 one, i.e. one 3×3 conv with weights
  ``(W_nin + I)·W_conv2``; diffusers' ``conv_shortcut`` (which reads the input) is set to zero;
* our decoder levels have ``num_res_blocks`` blocks, diffusers' ``layers_per_block + 1``: the extra
  last block of each up level is an identity (zero ``conv2``: x + 0);
* our 2×2 average pooling is diffusers' stride-2 3×3 ``Downsample2D`` conv with 1/4 on the top-left
  2×2 taps of each channel (its (0, 1, 0, 1) pad only meets zero taps);
* convs without bias (MAGE's residual convs, the encoder's ``conv_in``) get zero biases; the
  encoder's 1×1 ``conv_out`` is the centre tap of diffusers' 3×3; ``quant_conv`` and
  ``post_quant_conv`` are identities; no mid-block attention.

Back, a ``VQModel`` converts only when it has that form (as :func:`vqgan_to_diffusers` writes it):
otherwise UnsupportedError names the first layer that is not (a real diffusers VQModel, e.g. LDM's
VQ-f4, has biases and strided convs ours cannot hold).  The folded block does not split back: a
converted model returns with ``nin_shortcut = 0`` and the product in ``conv2``; outputs are equal.
Images are [0, 1] on both sides, as ours takes them (not the [-1, 1] of diffusers' pipelines).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from latentforge_core.checkpoint import load_into
from latentforge_core.errors import InputError, InputTypeError, UnsupportedError
from latentforge_tokenizers.diffusers_vae import _diffusers, diffusers_model
from latentforge_tokenizers.vqgan import VQGAN

log = logging.getLogger("latentforge")

SUPPORTED_CLASS = "VQModel"
GROUPS = 32  # ours: GroupNorm(32, ·) everywhere
DIFFUSERS_BETA = 0.25  # VQModel's quantizer commitment weight (fixed)


#################################################################################
#                                  Layer pairing                                #
#################################################################################


def _resnets(levels: int, blocks: int) -> Iterator[tuple[str, str]]:
    """(our prefix, diffusers prefix) of every residual block ours has."""
    for i in range(levels):
        for j in range(blocks):
            yield f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."
    for side in ("encoder", "decoder"):
        for n in (1, 2):
            yield f"{side}.mid.block_{n}.", f"{side}.mid_block.resnets.{n - 1}."
    for i in range(levels):
        for j in range(blocks):
            yield f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}."


def _plain(levels: int) -> dict[str, str]:
    """Our key → diffusers key of the tensors copied as they are (outside the residual blocks)."""
    pairs = {
        "encoder.conv_in.weight": "encoder.conv_in.weight",
        "decoder.conv_in.weight": "decoder.conv_in.weight",
        "decoder.conv_in.bias": "decoder.conv_in.bias",
        "decoder.conv_out.weight": "decoder.conv_out.weight",
        "decoder.conv_out.bias": "decoder.conv_out.bias",
        "encoder.conv_out.bias": "encoder.conv_out.bias",
        "quantize.embedding.weight": "quantize.embedding.weight",
    }
    for side in ("encoder", "decoder"):
        for kind in ("weight", "bias"):
            pairs[f"{side}.norm_out.{kind}"] = f"{side}.conv_norm_out.{kind}"
    for i in range(1, levels):
        for kind in ("weight", "bias"):
            pairs[f"decoder.up.{i}.upsample.conv.{kind}"] = (
                f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv.{kind}"
            )
    return pairs


def _avg_pool_weight(channels: int) -> torch.Tensor:
    """The stride-2 3×3 conv weight ``[C, C, 3, 3]`` that averages each channel's top-left 2×2 taps."""
    weight = torch.zeros(channels, channels, 3, 3)
    weight[torch.arange(channels), torch.arange(channels), :2, :2] = 0.25
    return weight


def _identity_1x1(channels: int) -> torch.Tensor:
    return torch.eye(channels)[:, :, None, None]


def _fold_shortcut(conv2: torch.Tensor, nin: torch.Tensor) -> torch.Tensor:
    """MAGE's ``nin(conv2(·)) + conv2(·)`` as one 3×3 weight ``(W_nin + I)·W_conv2``."""
    mix = nin[:, :, 0, 0].double() + torch.eye(nin.shape[0], dtype=torch.float64)  # out, out
    return torch.einsum("om,mikl->oikl", mix, conv2.double()).float()


#################################################################################
#                                 Ours → diffusers                              #
#################################################################################


def diffusers_vq_config(model: VQGAN) -> dict[str, Any]:
    """``VQModel`` constructor arguments of the model our VQGAN converts into."""
    cfg = model.config
    if cfg["ch_mult"][0] != 1:
        raise UnsupportedError(
            f"VQGAN ch_mult={list(cfg['ch_mult'])}: diffusers' encoder conv_in outputs block_out_channels[0] "
            "and its first level keeps that width, so ours must start at ch_mult[0] = 1 (MAGE's does)"
        )
    levels = len(cfg["ch_mult"])
    return dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[cfg["ch"] * m for m in cfg["ch_mult"]], layers_per_block=cfg["num_res_blocks"],
        act_fn="silu", latent_channels=cfg["z_channels"],
        sample_size=cfg["image_size"], num_vq_embeddings=cfg["n_embed"], norm_num_groups=GROUPS,
        vq_embed_dim=cfg["z_channels"], scaling_factor=1.0, norm_type="group", mid_block_add_attention=False,
    )  # fmt: skip


def vqgan_to_diffusers(model: VQGAN):
    """Our VQGAN as a diffusers ``VQModel`` computing the same function (see the module notes), fp32
    on the CPU, in our model's train/eval mode; it takes [0, 1] images, as ours."""
    if not isinstance(model, VQGAN):
        raise InputTypeError(f"vqgan_to_diffusers expects a VQGAN, got {type(model).__name__}")
    diffusers = _diffusers()
    config = diffusers_vq_config(model)
    if model.quantize.beta != DIFFUSERS_BETA:
        log.warning("VQGAN beta=%s: diffusers' VQModel fixes 0.25 (training only)", model.quantize.beta)
    vae = diffusers.VQModel(**config)
    ours = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in vae.state_dict().items()}  # every bias ours lacks is zero
    levels, blocks = len(config["block_out_channels"]), config["layers_per_block"]
    for key, target in _plain(levels).items():
        sd[target] = ours[key]
    sd["encoder.conv_out.weight"][:, :, 1:2, 1:2] = ours["encoder.conv_out.weight"]  # 1×1 as a 3×3 centre
    for mine, theirs in _resnets(levels, blocks):
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "conv1.weight"):
            sd[theirs + name] = ours[mine + name]
        conv2, nin = ours[mine + "conv2.weight"], ours.get(mine + "nin_shortcut.weight")
        sd[theirs + "conv2.weight"] = conv2 if nin is None else _fold_shortcut(conv2, nin)  # width change
    for j in range(levels):  # the extra last block of each up level: an identity (zero conv2)
        for name in ("norm1.weight", "norm2.weight"):
            sd[f"decoder.up_blocks.{j}.resnets.{blocks}.{name}"] = torch.ones_like(
                sd[f"decoder.up_blocks.{j}.resnets.{blocks}.{name}"]
            )
    for i in range(levels - 1):
        sd[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = _avg_pool_weight(
            config["block_out_channels"][i]
        )
    for name in ("quant_conv", "post_quant_conv"):
        sd[f"{name}.weight"] = _identity_1x1(config["latent_channels"])
    load_into(vae, sd)
    return vae.train(model.training)


#################################################################################
#                                 diffusers → ours                              #
#################################################################################


def _refuse(layer: str, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"diffusers VQModel layer {layer}: {why}. Our MAGE VQGAN cannot hold it, so this VQModel is not "
        "converted (only VQModels of our VQGAN's form convert back, as vqgan_to_diffusers writes them)"
    )


def _check_config(cfg: Any) -> None:
    checks = dict(
        in_channels=(cfg.in_channels, 3), out_channels=(cfg.out_channels, 3), act_fn=(cfg.act_fn, "silu"),
        norm_num_groups=(cfg.norm_num_groups, GROUPS), norm_type=(cfg.norm_type, "group"),
        mid_block_add_attention=(cfg.mid_block_add_attention, False),
        vq_embed_dim=(cfg.vq_embed_dim or cfg.latent_channels, cfg.latent_channels),
    )  # fmt: skip
    for name, (have, want) in checks.items():
        if have != want:
            raise UnsupportedError(f"diffusers VQModel {name}={have!r}: ours needs {want!r}")
    for name, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in getattr(cfg, name) if t != want]
        if bad:
            raise UnsupportedError(f"diffusers VQModel {name} {bad}: ours has only {want} (no attention)")
    widths = list(cfg.block_out_channels)
    if any(w % widths[0] for w in widths) or widths[0] % GROUPS:
        raise UnsupportedError(
            f"diffusers VQModel block_out_channels={widths}: ours has widths ch·ch_mult with ch a "
            f"multiple of {GROUPS}, ch_mult[0] = 1"
        )


def _expect_zero(sd: dict[str, torch.Tensor], key: str, why: str) -> None:
    if bool(sd[key].any()):
        raise _refuse(key, why)


def vqgan_from_diffusers(vae: Any, *, subfolder: str | None = None) -> VQGAN:
    """A diffusers ``VQModel`` of our VQGAN's form (a model, a ``save_pretrained`` folder or
    ``hf:<org>/<repo>``) as our VQGAN, fp32 on the CPU, in eval mode, computing the same function;
    UnsupportedError names the first setting or layer that is not of that form."""
    vae = diffusers_model(vae, SUPPORTED_CLASS, "vqgan_from_diffusers", subfolder=subfolder)
    cfg = vae.config
    _check_config(cfg)
    widths, levels, blocks = list(cfg.block_out_channels), len(cfg.block_out_channels), cfg.layers_per_block
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    model = VQGAN(
        ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=blocks,
        z_channels=cfg.latent_channels, n_embed=cfg.num_vq_embeddings, image_size=size, beta=DIFFUSERS_BETA,
    )  # fmt: skip
    theirs = {k: v.detach().cpu().float() for k, v in vae.state_dict().items()}
    no_bias = "ours has no bias there"
    _expect_zero(theirs, "encoder.conv_in.bias", no_bias)
    for name in ("quant_conv", "post_quant_conv"):
        eye = _identity_1x1(cfg.latent_channels)
        if not torch.equal(theirs[f"{name}.weight"], eye) or bool(theirs[f"{name}.bias"].any()):
            raise _refuse(name, "not an identity (ours has none)")
    conv_out = theirs["encoder.conv_out.weight"].clone()
    conv_out[:, :, 1, 1] = 0
    if bool(conv_out.any()):
        raise _refuse("encoder.conv_out", "a 3×3 conv with taps off the centre (ours is 1×1)")
    for i in range(levels - 1):
        key = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        if not torch.equal(theirs[key + ".weight"], _avg_pool_weight(widths[i])) or bool(
            theirs[key + ".bias"].any()
        ):
            raise _refuse(key, "a learned strided conv; ours downsamples by 2×2 average pooling")
    for j in range(levels):
        key = f"decoder.up_blocks.{j}.resnets.{blocks}"
        if bool(theirs[key + ".conv2.weight"].any()) or bool(theirs[key + ".conv2.bias"].any()):
            raise _refuse(
                key, f"not an identity; our decoder levels have {blocks} blocks, diffusers' {blocks + 1}"
            )
    sd = {key: theirs[target] for key, target in _plain(levels).items()}
    sd["encoder.conv_out.weight"] = theirs["encoder.conv_out.weight"][:, :, 1:2, 1:2]
    built = model.state_dict()
    for mine, prefix in _resnets(levels, blocks):
        for name in ("conv1.bias", "conv2.bias"):
            _expect_zero(theirs, prefix + name, no_bias)
        for name in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "conv1.weight",
            "conv2.weight",
        ):
            sd[mine + name] = theirs[prefix + name]
        if mine + "nin_shortcut.weight" in built:  # a width change
            for name in ("conv_shortcut.weight", "conv_shortcut.bias"):
                _expect_zero(theirs, prefix + name, "a shortcut of the block's input (ours reads its output)")
            sd[mine + "nin_shortcut.weight"] = torch.zeros_like(built[mine + "nin_shortcut.weight"])
    load_into(model, sd)
    return model.eval()


#################################################################################
#                                  Registry builder                             #
#################################################################################


def diffusers_vqmodel(*, pretrained: str | os.PathLike | None = None, subfolder: str | None = None) -> VQGAN:
    """The ``diffusers-vqmodel`` tokenizer: a diffusers ``VQModel`` folder (or ``hf:`` id) of our
    VQGAN's form, as our VQGAN, so every recipe that takes a VQGAN takes it."""
    if pretrained is None:
        raise InputError(
            "diffusers-vqmodel needs pretrained=<a diffusers VQModel folder or 'hf:<org>/<repo>'>"
        )
    return vqgan_from_diffusers(pretrained, subfolder=subfolder)

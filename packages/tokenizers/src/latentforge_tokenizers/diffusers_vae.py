"""VA-VAE ↔ diffusers ``AutoencoderKL``, both ways, and the ``diffusers-vae`` tokenizer.

Our :class:`~latentforge_tokenizers.vavae.VAVAE` is LDM's KL autoencoder, which is what diffusers'
``AutoencoderKL`` re-implements: the same ResNet blocks (GroupNorm eps 1e-6, SiLU), the same
asymmetric (0, 1, 0, 1) pad before each stride-2 conv, the same nearest ×2 upsampling, the same
single-head mid-block attention and the same posterior (moments split in two, logvar clamped to
[-30, 20]).  The conversion is a renaming of keys (``down.{i}.block.{j}`` ↔
``down_blocks.{i}.resnets.{j}``, ``up.{i}`` ↔ ``up_blocks.{L-1-i}``, ``nin_shortcut`` ↔
``conv_shortcut``, ``norm_out`` ↔ ``conv_norm_out``, …) plus one reshape: our attention's 1×1 conv
projections ``[C, C, 1, 1]`` are diffusers' linears ``to_q/to_k/to_v/to_out.0`` ``[C, C]``.

What does not carry over (refused with :class:`UnsupportedError` naming the setting):

* diffusers: one ``norm_num_groups`` for every GroupNorm; ours (LDM): ``min(32, channels)`` per layer.
  They agree only when every width is ≥ 32 with 32 groups (every real VAE), or all widths equal
  the group count.
* ours: always a mid-block attention, a ``quant_conv`` and a ``post_quant_conv``, 3-channel RGB,
  SiLU, widths that are multiples of the first; diffusers may switch each off or change it.
* the latent normalisation: diffusers' ``scaling_factor``/``shift_factor`` (``z ↦ (z − shift)·scale``)
  or ``latents_mean``/``latents_std`` (``z ↦ (z − mean)·scale / std``, as SDXL-style pipelines do)
  become our per-channel :class:`LatentStats` and back.

diffusers is imported lazily (it is a development dependency, not one of this package's); without it
every entry point raises :class:`MissingDependencyError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from latentforge_core.checkpoint import load_into
from latentforge_core.errors import (
    InputError,
    InputTypeError,
    MissingDependencyError,
    MissingFileError,
    UnsupportedError,
)
from latentforge_core.hub import HubId, is_hub_id, resolve
from latentforge_tokenizers.stats import LatentStats
from latentforge_tokenizers.vavae import VAVAE

log = logging.getLogger("latentforge")

SUPPORTED_CLASS = "AutoencoderKL"
# every diffusers class a latentforge tokenizer converts -> (that tokenizer, the models it covers)
CONVERTED_CLASSES = {
    "AutoencoderKL": ("diffusers-vae", "LDM's KL autoencoder: Stable Diffusion's VAEs, REPA-E's VAEs, ..."),
    "AutoencoderRAE": ("diffusers-rae", "RAE: a DINOv2-with-registers, SigLIP2 or MAE encoder + ViT decoder"),
    "VQModel": ("diffusers-vqmodel", "only VQModels of our MAGE VQGAN's form, as vqgan_to_diffusers writes"),
}
# diffusers block type -> whether the stage has an attention after each ResNet block
DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_NAME = "config.json"


def _diffusers():
    """The diffusers module, or MissingDependencyError saying how to get it."""
    try:
        import diffusers
    except ImportError as err:
        raise MissingDependencyError(
            "the diffusers interop (the *_to_diffusers / *_from_diffusers converters, the 'diffusers-vae', "
            "'diffusers-rae' and 'diffusers-vqmodel' tokenizers) needs diffusers, which is not installed: "
            "pip install diffusers"
        ) from err
    return diffusers


#################################################################################
#                                    Key mapping                                #
#################################################################################

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET = {"nin_shortcut": "conv_shortcut"}


def _ours_to_diffusers_key(key: str, levels: int) -> str:
    """One key of our state dict in diffusers' layout (``levels`` = len(ch_mult))."""
    parts = key.split(".")
    top = parts[0]
    if top in ("quant_conv", "post_quant_conv"):
        return key
    if top not in ("encoder", "decoder"):
        raise UnsupportedError(f"VA-VAE key {key!r} has no diffusers AutoencoderKL counterpart")
    rest = parts[1:]
    head = rest[0]
    if head == "conv_in" or head == "conv_out":
        out = rest
    elif head == "norm_out":
        out = ["conv_norm_out", *rest[1:]]
    elif head == "mid":
        sub = rest[1]
        if sub in ("block_1", "block_2"):
            idx = "0" if sub == "block_1" else "1"
            out = ["mid_block", "resnets", idx, *_rename(rest[2:], _RESNET)]
        else:  # attn_1
            out = ["mid_block", "attentions", "0", *_rename(rest[2:], _ATTN)]
    elif head in ("down", "up"):
        level = int(rest[1])
        block = "down_blocks" if head == "down" else "up_blocks"
        index = str(level if head == "down" else levels - 1 - level)
        kind = rest[2]
        if kind == "block":
            out = [block, index, "resnets", rest[3], *_rename(rest[4:], _RESNET)]
        elif kind == "attn":
            out = [block, index, "attentions", rest[3], *_rename(rest[4:], _ATTN)]
        elif kind == "downsample":
            out = [block, index, "downsamplers", "0", *rest[3:]]
        elif kind == "upsample":
            out = [block, index, "upsamplers", "0", *rest[3:]]
        else:
            raise UnsupportedError(f"VA-VAE key {key!r} has no diffusers AutoencoderKL counterpart")
    else:
        raise UnsupportedError(f"VA-VAE key {key!r} has no diffusers AutoencoderKL counterpart")
    return ".".join([top, *out])


def _rename(parts: list[str], table: Mapping[str, str]) -> list[str]:
    return [*table.get(parts[0], parts[0]).split("."), *parts[1:]]


_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _is_attention_linear(diffusers_key: str) -> bool:
    return _LINEAR.search(diffusers_key) is not None


def _key_map(model: VAVAE) -> dict[str, str]:
    """Our key → diffusers key for every tensor of ``model`` but the VF projection."""
    levels = len(model.config["ch_mult"])
    return {
        k: _ours_to_diffusers_key(k, levels) for k in model.state_dict() if not k.startswith("linear_proj.")
    }


#################################################################################
#                                   Ours → diffusers                            #
#################################################################################


def _group_counts(model: torch.nn.Module) -> set[int]:
    return {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}


def _stats_to_config(stats: LatentStats | None, z_channels: int) -> dict[str, Any]:
    """Our latent statistics as diffusers' config entries (scaling/shift, else latents_mean/std)."""
    if stats is None:
        return dict(scaling_factor=1.0, shift_factor=None, latents_mean=None, latents_std=None)
    if stats.shape != (z_channels, 1, 1):
        raise UnsupportedError(
            f"latent statistics of shape {stats.shape} (per element) have no diffusers AutoencoderKL "
            "form, which holds a scale/shift or per-channel latents_mean/latents_std: set_stats(None) "
            "first, or use per-channel statistics"
        )
    std = torch.sqrt(stats.var.double() + stats.eps).flatten()
    mean = torch.zeros_like(std) if stats.mean is None else stats.mean.double().flatten()
    if bool((std == std[0]).all()) and bool((mean == mean[0]).all()):  # one scale for all channels
        shift = float(mean[0])
        return dict(
            scaling_factor=1.0 / float(std[0]),
            shift_factor=shift if shift != 0.0 else None,
            latents_mean=None,
            latents_std=None,
        )
    return dict(scaling_factor=1.0, shift_factor=None, latents_mean=mean.tolist(), latents_std=std.tolist())


def vavae_to_diffusers(model: VAVAE):
    """Our VA-VAE as a diffusers ``AutoencoderKL`` with the same weights (``linear_proj``, the VF
    loss's training-only projection, has no counterpart and is left out); per-channel latent
    statistics go into the config (``scaling_factor``/``shift_factor`` when one value fits every
    channel, else ``latents_mean``/``latents_std`` with ``scaling_factor=1``).

    The result has our model's device, dtype and train/eval mode.  UnsupportedError when the model
    uses more than one GroupNorm group count (a width below 32: LDM's ``min(32, channels)``), which
    diffusers' single ``norm_num_groups`` cannot express."""
    if not isinstance(model, VAVAE):
        raise InputTypeError(f"vavae_to_diffusers expects a VAVAE, got {type(model).__name__}")
    diffusers = _diffusers()
    cfg = model.config
    groups = _group_counts(model)
    if len(groups) != 1:
        widths = sorted({cfg["ch"] * m for m in cfg["ch_mult"]})
        raise UnsupportedError(
            f"this VA-VAE normalises with {sorted(groups)} GroupNorm groups (LDM's min(32, channels) over "
            f"widths {widths}), but diffusers' AutoencoderKL has one norm_num_groups for every layer: "
            "build it with ch ≥ 32 (every width ≥ 32 gives 32 groups throughout)"
        )
    if cfg["dropout"]:
        log.warning(
            "VA-VAE dropout=%s has no diffusers AutoencoderKL setting: the converted model has none "
            "(inference is unaffected)",
            cfg["dropout"],
        )
    down = [bool(len(stage.attn)) for stage in model.encoder.down]
    up = [bool(len(stage.attn)) for stage in model.decoder.up]  # our up[i] is level i
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in down],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(up)],
        block_out_channels=[cfg["ch"] * m for m in cfg["ch_mult"]],
        layers_per_block=cfg["num_res_blocks"],
        act_fn="silu",
        latent_channels=cfg["z_channels"],
        norm_num_groups=groups.pop(),
        sample_size=cfg["resolution"],
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        **_stats_to_config(model.stats, cfg["z_channels"]),
    )
    vae = diffusers.AutoencoderKL(**config)
    ours = model.state_dict()
    sd = {}
    for key, target in _key_map(model).items():
        t = ours[key].detach().cpu()
        sd[target] = t.reshape(t.shape[:2]) if _is_attention_linear(target) else t
    load_into(vae, sd)
    param = next(model.parameters())
    vae.to(device=param.device)
    if param.dtype != torch.float32:
        vae.to(dtype=param.dtype)
    return vae.train(model.training)


#################################################################################
#                                   diffusers → ours                            #
#################################################################################


def _unsupported(setting: str, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"diffusers AutoencoderKL with {setting}: {why}; our VA-VAE (LDM's KL autoencoder) cannot "
        "express it, so it is not converted"
    )


def _check_config(cfg: Mapping[str, Any]) -> tuple[list[int], list[bool]]:
    """(block_out_channels, attention per level) of a diffusers AutoencoderKL config our VAVAE can
    express; else UnsupportedError naming the setting."""
    for name in ("in_channels", "out_channels"):
        if cfg.get(name, 3) != 3:
            raise _unsupported(f"{name}={cfg[name]}", "ours takes and gives 3-channel RGB")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise _unsupported(f"act_fn={cfg['act_fn']!r}", "ours uses SiLU throughout")
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not cfg.get(name, True):
            what = "a mid-block attention" if name == "mid_block_add_attention" else f"a {name[4:]}"
            raise _unsupported(f"{name}=False", f"ours always has {what}")
    widths = [int(c) for c in cfg.get("block_out_channels", (64,))]
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    for types, table, name in ((down, DOWN_BLOCKS, "down_block_types"), (up, UP_BLOCKS, "up_block_types")):
        bad = [t for t in types if t not in table]
        if bad:
            raise _unsupported(f"{name} {bad}", f"ours has only {sorted(table)}")
        if len(types) != len(widths):
            raise _unsupported(
                f"{len(types)} {name} for {len(widths)} block_out_channels", "ours has one stage per width"
            )
    attn = [DOWN_BLOCKS[t] for t in down]
    if attn != [UP_BLOCKS[t] for t in reversed(up)]:
        raise _unsupported(
            f"down_block_types {down} and up_block_types {up}",
            "ours puts attention at the same resolutions in encoder and decoder",
        )
    if any(w % widths[0] for w in widths):
        raise _unsupported(
            f"block_out_channels={widths}", "ours has widths ch·ch_mult, multiples of the first"
        )
    groups = int(cfg.get("norm_num_groups", 32))
    if any(min(32, w) != groups for w in widths):
        raise _unsupported(
            f"norm_num_groups={groups} over block_out_channels={widths}",
            "ours normalises each layer with min(32, channels) groups (LDM)",
        )
    return widths, attn


def _square_size(cfg: Mapping[str, Any]) -> int:
    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise InputError(
                f"diffusers AutoencoderKL sample_size={list(size)} is not square: pass image_size="
            )
        size = size[0]
    return int(size)


def stats_from_config(cfg: Mapping[str, Any], z_channels: int) -> LatentStats | None:
    """Our per-channel latent statistics from a diffusers config (None when it holds no scaling: a
    ``scaling_factor`` of 1 without shift, mean or std).

    ``latents_mean``/``latents_std`` normalise as SDXL-style pipelines do, ``(z − mean)·scale / std``;
    otherwise ``(z − shift_factor)·scaling_factor``; we store mean and var = (std / scale)²."""
    scale = cfg.get("scaling_factor")
    scale = 1.0 if scale is None else float(scale)
    shift = cfg.get("shift_factor")
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"diffusers AutoencoderKL scaling_factor={scale} must be a positive number")
    if mean is not None or std is not None:
        if shift:
            raise _unsupported(
                f"shift_factor={shift} together with latents_mean/latents_std",
                "no pipeline convention combines them",
            )
        mean_t = torch.zeros(z_channels) if mean is None else torch.tensor(mean, dtype=torch.float64)
        std_t = torch.ones(z_channels) if std is None else torch.tensor(std, dtype=torch.float64)
        for name, t in (("latents_mean", mean_t), ("latents_std", std_t)):
            if t.numel() != z_channels:
                raise InputError(
                    f"diffusers AutoencoderKL {name} has {t.numel()} values for {z_channels} latent channels"
                )
        std_t = std_t.flatten().double() / scale
        return LatentStats(std_t**2, mean_t.flatten().double() if mean is not None else None)
    if scale == 1.0 and not shift:
        return None
    var = torch.full((z_channels,), 1.0 / scale**2, dtype=torch.float64)
    return LatentStats(var, torch.full((z_channels,), float(shift), dtype=torch.float64) if shift else None)


def vavae_from_diffusers(
    vae: Any,
    *,
    image_size: int | None = None,
    vf_dim: int | None = None,
    stats: Any = "config",
    subfolder: str | None = None,
) -> VAVAE:
    """A diffusers ``AutoencoderKL`` (a model, a folder saved by ``save_pretrained``, a pipeline folder
    with a ``vae/`` subfolder, or ``hf:<org>/<repo>[/<subfolder>][@<revision>]``) as our VAVAE, fp32 on
    the CPU, in eval mode, with the same weights.

    ``image_size`` sets the input size of ``preprocessing`` (default: the config's ``sample_size``);
    ``vf_dim`` builds the VF projection (``linear_proj``, left at its initialisation: diffusers has
    none); ``stats`` is ``"config"`` (the config's scaling as :class:`LatentStats`, or none when it
    holds none), a statistics file, a :class:`LatentStats`, or ``None`` for none (a run computes its
    own).  UnsupportedError names any setting our VAVAE cannot express."""
    vae = diffusers_model(vae, SUPPORTED_CLASS, "vavae_from_diffusers", subfolder=subfolder)
    cfg = dict(vae.config)
    widths, attn = _check_config(cfg)
    resolution = _square_size(cfg) if image_size is None else image_size
    model = VAVAE(
        ch=widths[0],
        ch_mult=[w // widths[0] for w in widths],
        num_res_blocks=int(cfg.get("layers_per_block", 1)),
        attn_resolutions=[resolution // 2**i for i, a in enumerate(attn) if a],
        resolution=resolution,
        z_channels=int(cfg.get("latent_channels", 4)),
        vf_dim=vf_dim,
    )
    theirs = vae.state_dict()
    mapping = _key_map(model)
    missing = sorted(set(mapping.values()) - set(theirs))
    extra = sorted(set(theirs) - set(mapping.values()))
    if missing or extra:  # a subclass or a patched model with other modules
        raise UnsupportedError(
            f"diffusers {type(vae).__name__} state dict does not match the AutoencoderKL layout of its "
            f"config: missing {missing[:8]}, unexpected {extra[:8]}"
        )
    sd = {}
    for key, source in mapping.items():
        t = theirs[source].detach().to(device="cpu", dtype=torch.float32)
        sd[key] = t[:, :, None, None] if _is_attention_linear(source) else t
    if model.linear_proj is not None:
        sd |= {f"linear_proj.{k}": v for k, v in model.linear_proj.state_dict().items()}
        log.info("diffusers AutoencoderKL has no VF projection: linear_proj stays at its initialisation")
    load_into(model, sd)
    model.set_stats(chosen_stats(stats, "config", lambda: stats_from_config(cfg, model.z_channels)))
    return model.eval()


def chosen_stats(stats: Any, keyword: str, from_diffusers: Callable[[], LatentStats]) -> LatentStats | None:
    """The latent statistics a converted tokenizer gets: ``keyword`` (the diffusers model's own,
    ``from_diffusers()``), a statistics file, a :class:`LatentStats`, or None (raw latents)."""
    if isinstance(stats, str) and stats == keyword:
        return from_diffusers()
    if isinstance(stats, LatentStats) or stats is None:
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return LatentStats.load(stats)
    raise InputTypeError(
        f"stats must be {keyword!r}, a statistics file, a LatentStats or None, got {type(stats).__name__}"
    )


#################################################################################
#                                      Loading                                  #
#################################################################################


def class_message(cls: str | None, where: str, expected: str) -> str:
    """``where`` holds diffusers class ``cls``, not ``expected``: the message lists every class we convert."""
    tokenizer, _ = CONVERTED_CLASSES[expected]
    listing = "; ".join(f"{c} → '{t}' ({what})" for c, (t, what) in CONVERTED_CLASSES.items())
    return (
        f"{where} holds a diffusers {cls or 'model of unknown class'}; the {tokenizer} tokenizer converts "
        f"{expected} only. Supported diffusers classes: {listing}"
    )


def _read_class(config: Path) -> str | None:
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{config}: not a readable diffusers config ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{config}: not a diffusers config (a JSON {type(data).__name__})")
    return data.get("_class_name")


def _local_folder(path: Path, subfolder: str | None, expected: str) -> Path:
    if path.is_file():
        hint = (
            ". For an LDM/VA-VAE state dict use 'vavae-f16d32' with pretrained="
            if expected == SUPPORTED_CLASS
            else ""
        )
        raise InputError(
            f"{path} is a file; the {CONVERTED_CLASSES[expected][0]} tokenizer takes a diffusers model "
            f"folder (config.json + diffusion_pytorch_model.safetensors, as save_pretrained writes){hint}"
        )
    if subfolder:
        path = path / subfolder
    elif not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"  # a pipeline folder
    if not (path / CONFIG_NAME).is_file():
        raise MissingFileError(f"{path} has no {CONFIG_NAME}: expected a diffusers {expected} folder")
    return path


def _hub_folder(hub: HubId, subfolder: str | None, expected: str) -> Path:
    """Download only the config and the weights (not a whole pipeline repository)."""
    sub = (subfolder or hub.file or "").strip("/")

    def fetch(name: str) -> Path:
        return resolve(str(HubId(hub.repo, f"{sub}/{name}" if sub else name, hub.revision)))

    try:
        config = fetch(CONFIG_NAME)
    except MissingFileError:
        if sub:
            raise
        sub = "vae"  # a pipeline repository
        config = fetch(CONFIG_NAME)
    cls = _read_class(config)
    if cls != expected:
        raise UnsupportedError(class_message(cls, str(hub), expected))
    errors = []
    for name in WEIGHT_NAMES:
        try:
            fetch(name)
            return config.parent
        except MissingFileError as err:
            errors.append(str(err))
    raise MissingFileError(f"{hub}: no diffusers weights ({', '.join(WEIGHT_NAMES)}): {errors[0]}")


def load_diffusers_model(source: str | os.PathLike, expected: str, *, subfolder: str | None = None):
    """diffusers' ``<expected>.from_pretrained`` on a local folder or an ``hf:`` id (a pipeline's
    ``vae/`` subfolder found by itself), after checking the folder's ``_class_name``
    (UnsupportedError naming it and every class we convert)."""
    diffusers = _diffusers()
    if is_hub_id(source):
        folder = _hub_folder(HubId.parse(str(source)), subfolder, expected)
    else:
        folder = _local_folder(resolve(source), subfolder, expected)
        cls = _read_class(folder / CONFIG_NAME)
        if cls != expected:
            raise UnsupportedError(class_message(cls, str(folder), expected))
    return getattr(diffusers, expected).from_pretrained(folder, torch_dtype=torch.float32).eval()


def diffusers_model(vae: Any, expected: str, converter: str, *, subfolder: str | None = None):
    """``vae`` as a diffusers ``<expected>``: a model of that class, or a folder / ``hf:`` id loaded
    through :func:`load_diffusers_model`; another diffusers class is refused listing the ones we
    convert, anything else naming what ``converter`` takes."""
    diffusers = _diffusers()
    if isinstance(vae, (str, os.PathLike)):
        vae = load_diffusers_model(vae, expected, subfolder=subfolder)
    if not isinstance(vae, getattr(diffusers, expected)):
        if isinstance(vae, diffusers.ModelMixin):
            raise UnsupportedError(class_message(type(vae).__name__, "this model", expected))
        raise InputTypeError(
            f"{converter} expects a diffusers {expected}, a folder or an 'hf:<org>/<repo>' id, "
            f"got {type(vae).__name__}"
        )
    return vae


def load_autoencoder_kl(source: str | os.PathLike, *, subfolder: str | None = None):
    """:func:`load_diffusers_model` for an ``AutoencoderKL``."""
    return load_diffusers_model(source, SUPPORTED_CLASS, subfolder=subfolder)


#################################################################################
#                                  Registry builder                             #
#################################################################################


def diffusers_vae(
    *,
    pretrained: str | os.PathLike | None = None,
    stats: Any = "config",
    image_size: int | None = None,
    vf_dim: int | None = None,
    subfolder: str | None = None,
) -> VAVAE:
    """The ``diffusers-vae`` tokenizer: a diffusers ``AutoencoderKL`` (``pretrained=`` a folder or
    ``hf:<org>/<repo>``, e.g. ``hf:stabilityai/sd-vae-ft-mse``) converted to our VAVAE, so every
    recipe that takes a VA-VAE takes it.  ``stats`` as in :func:`vavae_from_diffusers`."""
    if pretrained is None:
        raise InputError(
            "diffusers-vae needs pretrained=<a diffusers AutoencoderKL folder or 'hf:<org>/<repo>'>"
        )
    return vavae_from_diffusers(
        pretrained, image_size=image_size, vf_dim=vf_dim, stats=stats, subfolder=subfolder
    )

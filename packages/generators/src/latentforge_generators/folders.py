"""DiT-family backbones as diffusers-style model folders: ``config.json`` + safetensors weights.

A folder holds ``config.json`` (``_class_name``, a version header and the constructor arguments)
and ``diffusion_pytorch_model.safetensors``, the layout diffusers' ``save_pretrained`` writes.  Two
kinds of folder are written and read:

* ours (``DiT``, ``SiT``, ``LightningDiT``, ``RAELightningDiT``, ``DiTDH``): our constructor
  arguments, read off the built modules, and our state dict (the official key layout);
* ``DiTTransformer2DModel``: a plain DiT in diffusers' own layout and config, which diffusers loads
  with ``DiTTransformer2DModel.from_pretrained`` (the conversion of ``convert.py``).

``from_pretrained`` reads either back; a registered generator reads one through
``pretrained=<folder>`` (``convert.load_official``), so ``sample``'s ``generator.params.pretrained``
takes a folder as it takes an official file.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from latentforge_core.checkpoint import (
    CheckpointError,
    atomic_path,
    load_checkpoint,
    load_into,
    save_checkpoint,
)
from latentforge_core.errors import InputError, InputTypeError, MissingFileError
from latentforge_core.hub import HubId, is_hub_id, resolve
from latentforge_core.transformer import SwiGLU
from latentforge_generators.convert import (
    diffusers_config,
    dit_from_diffusers_state_dict,
    dit_to_diffusers_state_dict,
)
from latentforge_generators.dit import DiT, SiT
from latentforge_generators.ditdh import DiTDH
from latentforge_generators.layers import FourierTimestepEmbedder
from latentforge_generators.lightningdit import LightningDiT, RAELightningDiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_DIT = "DiTTransformer2DModel"
CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (DiT, SiT, LightningDiT, RAELightningDiT, DiTDH)
}  # exact classes: a subclass has its own name here or none
LAYOUTS = ("latentforge", "diffusers")


#################################################################################
#                            Constructor arguments                              #
#################################################################################


def _mlp_ratio(block: nn.Module, dim: int) -> float:
    """The ``mlp_ratio`` that built ``block`` (SwiGLU keeps ⌊2/3·⌊dim·ratio⌋⌋ of it: searched)."""
    if not isinstance(block.mlp, SwiGLU):
        return block.mlp.fc1.out_features / dim
    width = block.mlp.w3.in_features
    for ratio in (4.0, *(k / 8 for k in range(1, 257))):
        if int(2 / 3 * int(dim * ratio)) == width:
            return ratio
    raise CheckpointError(f"cannot recover the mlp_ratio of a SwiGLU of width {width} at dim {dim}")


def constructor_arguments(model: nn.Module) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model`` (one of :data:`CLASSES`), read off its modules."""
    name = type(model).__name__
    if CLASSES.get(name) is not type(model):
        raise InputTypeError(
            f"no model folder for a {name}; expected one of {sorted(CLASSES)} (a FlowGenerator's backbone)"
        )
    common = dict(
        input_size=model.input_size, patch_size=model.patch_size, in_channels=model.in_channels,
        hidden_size=model.hidden_size, depth=model.depth, num_classes=model.num_classes,
        class_dropout_prob=model.y_embedder.dropout_prob,
        mlp_ratio=_mlp_ratio(model.blocks[0], model.hidden_size),
        use_qknorm=not isinstance(model.blocks[0].attn.q_norm, nn.Identity),
    )  # fmt: skip
    if isinstance(model, DiTDH):
        head = model.blocks[model.depth]
        return common | dict(
            num_heads=model.blocks[0].attn.num_heads, head_hidden_size=model.head_hidden_size,
            head_depth=model.head_depth, head_num_heads=head.attn.num_heads,
        )  # fmt: skip
    block = model.blocks[0]
    args = common | dict(
        num_heads=model.num_heads, learn_sigma=model.learn_sigma, norm_eps=model.norm_eps,
        use_rmsnorm=not isinstance(block.norm1, nn.LayerNorm), use_swiglu=isinstance(block.mlp, SwiGLU),
        use_rope=model.feat_rope is not None,
    )  # fmt: skip
    if isinstance(model, RAELightningDiT):
        return args  # Fourier time features are the class's own
    fourier = isinstance(model.t_embedder, FourierTimestepEmbedder)
    args["time_embedding"] = "fourier" if fourier else "sinusoidal"
    if not fourier:
        args["time_freq_shift"] = model.t_embedder.freq_shift
    return args


#################################################################################
#                                    Writing                                    #
#################################################################################


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def save_pretrained(model: nn.Module, folder: str | os.PathLike, *, layout: str = "latentforge") -> Path:
    """Write ``model`` (a backbone, or a FlowGenerator's) to ``folder``: ``layout="latentforge"``
    our class and state dict, ``"diffusers"`` a ``DiTTransformer2DModel`` folder (plain DiT only)."""
    model = getattr(model, "backbone", model)
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "diffusers":
        if type(model) not in (DiT, SiT):
            raise InputTypeError(
                f"only a plain DiT has a diffusers {DIFFUSERS_DIT} folder, got a {type(model).__name__}; "
                "write it with layout='latentforge'"
            )
        config = {"_class_name": DIFFUSERS_DIT, "_diffusers_version": _version("diffusers"),
                  **diffusers_config(model)}  # fmt: skip
        state = dit_to_diffusers_state_dict(model.state_dict())
        state = {k: v.clone() for k, v in state.items()}  # the per-block embedder copies share storage
    else:
        config = {"_class_name": type(model).__name__,
                  "_latentforge_version": _version("latentforge-generators"),
                  **constructor_arguments(model)}  # fmt: skip
        state = model.state_dict()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, folder / WEIGHTS_NAME)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


#################################################################################
#                                    Reading                                    #
#################################################################################


def is_model_folder(source: object) -> bool:
    """Whether ``source`` is a model folder to read: a local folder with a ``config.json``, or a hub
    id of a whole repository (``hf:<org>/<repo>``, no file: an official checkpoint is one file)."""
    if is_hub_id(source):
        return HubId.parse(str(source)).file is None
    return (
        isinstance(source, (str, os.PathLike))
        and Path(source).is_dir()
        and (Path(source) / CONFIG_NAME).is_file()
    )


def read_folder(source: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(class name, constructor arguments, state dict in our layout) of a model folder (or hub id)."""
    folder = resolve(source)
    if not (folder / CONFIG_NAME).is_file():
        raise MissingFileError(
            f"{folder} has no {CONFIG_NAME}: expected a model folder (config.json + weights)"
        )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in (*CLASSES, DIFFUSERS_DIT):
        raise CheckpointError(
            f"{folder} holds a {cls or 'model without a _class_name'}; the generator model folders read "
            f"here are of classes {', '.join([*CLASSES, DIFFUSERS_DIT])}"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise MissingFileError(f"{folder} has no {WEIGHTS_NAME}")
    state, _ = load_checkpoint(folder / WEIGHTS_NAME)
    args = {k: v for k, v in config.items() if not k.startswith("_")}
    if cls != DIFFUSERS_DIT:
        return cls, args, state
    hidden = args["num_attention_heads"] * args["attention_head_dim"]
    in_channels = args.get("in_channels", 4)
    out_channels = args.get("out_channels") or in_channels
    ours = dict(
        input_size=args["sample_size"], patch_size=args["patch_size"], in_channels=in_channels,
        hidden_size=hidden, depth=args["num_layers"], num_heads=args["num_attention_heads"],
        num_classes=args["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels,
        norm_eps=args.get("norm_eps", 1e-5), time_freq_shift=1,
    )  # fmt: skip
    return "DiT", ours, dit_from_diffusers_state_dict(state, args["sample_size"], hidden)


def from_pretrained(source: str | os.PathLike, **overrides: Any) -> nn.Module:
    """The backbone a model folder (local or ``hf:<org>/<repo>``) holds, with its weights, in eval
    mode; ``overrides`` replace constructor arguments (a ``DiTTransformer2DModel`` folder becomes our
    DiT with diffusers' frequencies, ``time_freq_shift=1``, and its ``norm_eps``)."""
    cls, args, state = read_folder(source)
    model = CLASSES[cls](**{**args, **overrides})
    load_into(model, state, strict=True)
    return model.eval()

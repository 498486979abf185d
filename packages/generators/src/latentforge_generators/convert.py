"""Checkpoint converters for the DiT family: official files in, diffusers' DiT in and out.

Our DiT, LightningDiT and DiT-DH use the parameter names of their official code, so an official
state dict needs no renaming: ``load_official`` only unwraps the training-checkpoint containers
(``{"ema": …}``/``{"model": …}``, EMA preferred as the authors' inference does) and strips wrapper
prefixes (``module.``, ``_orig_mod.``) before a strict load.

diffusers' ``DiTTransformer2DModel`` stores the same weights differently: q, k, v as three linears,
and a copy of the time/label embedders inside every block (block 0's copy also feeds the final
layer).  Our DiT shares one embedder, so a diffusers model converts only while every block's copy
equals block 0's (true of any conversion of an official DiT file); a fine-tune whose copies drifted
apart is refused with the blocks that differ, since dropping them would change its outputs.  Two
details of that port differ from the DiT code: its sinusoidal frequencies divide by ``half − 1``
(``time_freq_shift=1`` here reproduces it) and each block's second LayerNorm uses
``config.norm_eps`` (DiT's is 1e-6), which becomes our DiT's ``norm_eps`` and is written back.
diffusers is not a dependency: it is imported only when asked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from latentforge_core.checkpoint import CheckpointError, load_into, load_state_file
from latentforge_core.errors import InputError
from latentforge_generators.dit import DiT
from latentforge_generators.layers import Mlp, sincos_pos_embed_2d

_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, our FlowGenerator
# REPA's projector MLPs and REPA-E's latent BatchNorm (the tokenizer's statistics, which ship with its
# VAE), saved inside their SiT checkpoints
_TRAINING_ONLY = ("projectors.", "bn.")


#################################################################################
#                              Official checkpoints                             #
#################################################################################
def official_state_dict(obj: Mapping | str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from an official DiT / LightningDiT / RAE stage-2 file or loaded object."""
    if isinstance(obj, (str, os.PathLike)):
        obj = load_state_file(obj)  # .pt/.pth with weights_only=True, or safetensors
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a state dict or a training checkpoint dict, got {type(obj).__name__}"
        )
    for key in ("ema", "model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {}
    for name, value in obj.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"entry {name!r} is a {type(value).__name__}, expected a tensor")
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if not name.startswith(_TRAINING_ONLY):
            state[name] = value
    return state


def load_official(model: nn.Module, source: Mapping | str | os.PathLike) -> nn.Module:
    """Strictly load an official checkpoint (path or object) or a model folder (``folders.py``:
    ours or diffusers' ``DiTTransformer2DModel``) into ``model``; returns ``model``."""
    from latentforge_generators.folders import is_model_folder, read_folder  # it imports this module

    if is_model_folder(source):
        cls, _, state = read_folder(source)
        if cls != type(model).__name__:
            raise CheckpointError(
                f"{source} is a model folder of a {cls}, but the generator builds a {type(model).__name__}: "
                "choose the registered generator of that class"
            )
    else:
        state = official_state_dict(source)
    check_latent_shape(model, state, source if isinstance(source, (str, os.PathLike)) else "the checkpoint")
    load_into(model, state, strict=True)
    return model


def check_latent_shape(model: nn.Module, state: Mapping[str, torch.Tensor], source: object) -> None:
    """Weights for latents of another size or channel count (a 512-px release in a 256-px protocol, a
    generator of another tokenizer's latents), said in those words rather than as shape mismatches."""
    ours = model.state_dict()
    found, built = {}, {}
    if "x_embedder.proj.weight" in state and "x_embedder.proj.weight" in ours:
        found["in_channels"] = state["x_embedder.proj.weight"].shape[1]
        built["in_channels"] = ours["x_embedder.proj.weight"].shape[1]
    if "pos_embed" in state and "pos_embed" in ours:
        patch = ours["x_embedder.proj.weight"].shape[-1] if "x_embedder.proj.weight" in ours else 1
        for shapes, table in ((found, state["pos_embed"]), (built, ours["pos_embed"])):
            shapes["input_size"] = round(table.shape[-2] ** 0.5) * patch  # a square grid of patches
    if found == built:
        return
    shown = lambda shapes: ", ".join(f"{k}={v}" for k, v in shapes.items())  # noqa: E731
    raise CheckpointError(
        f"{source} holds weights for latents with {shown(found)}, but this {type(model).__name__} is "
        f"built for {shown(built)} (the tokenizer's latents): the weights were trained at another "
        "resolution or on another tokenizer's latents. Give the tokenizer and image size they were "
        "trained with (for a repro-* config: the config of their resolution, e.g. the -512 one)"
    )


#################################################################################
#                                diffusers' DiT                                 #
#################################################################################
def dit_to_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our / official DiT state dict → ``DiTTransformer2DModel`` state dict."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"],
        "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[theirs + f"norm1.emb.timestep_embedder.linear_1.{kind}"] = state[f"t_embedder.mlp.0.{kind}"]
            out[theirs + f"norm1.emb.timestep_embedder.linear_2.{kind}"] = state[f"t_embedder.mlp.2.{kind}"]
            out[theirs + f"norm1.linear.{kind}"] = state[ours + f"adaLN_modulation.1.{kind}"]
            q, k, v = state[ours + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[theirs + f"attn1.to_q.{kind}"], out[theirs + f"attn1.to_k.{kind}"] = q, k
            out[theirs + f"attn1.to_v.{kind}"] = v
            out[theirs + f"attn1.to_out.0.{kind}"] = state[ours + f"attn.proj.{kind}"]
            out[theirs + f"ff.net.0.proj.{kind}"] = state[ours + f"mlp.fc1.{kind}"]
            out[theirs + f"ff.net.2.{kind}"] = state[ours + f"mlp.fc2.{kind}"]
        out[theirs + "norm1.emb.class_embedder.embedding_table.weight"] = state[
            "y_embedder.embedding_table.weight"
        ]
    return out


def dit_from_diffusers_state_dict(state: Mapping[str, torch.Tensor], input_size: int, hidden_size: int):
    """``DiTTransformer2DModel`` state dict → ours (block 0's embedder copies become the shared ones).

    ``pos_embed`` is a non-persistent buffer in diffusers, so the sin-cos table is rebuilt here.
    Raises ``CheckpointError`` naming the blocks whose embedder copies differ from block 0's.
    """
    patch = state["pos_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    emb = "transformer_blocks.0.norm1.emb."
    _check_shared_embedders(state, depth)
    out = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"],
        "x_embedder.proj.bias": state["pos_embed.proj.bias"],
        "pos_embed": sincos_pos_embed_2d(hidden_size, input_size // patch).unsqueeze(0),
        "y_embedder.embedding_table.weight": state[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
        "final_layer.linear.weight": state["proj_out_2.weight"],
        "final_layer.linear.bias": state["proj_out_2.bias"],
    }
    for kind in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{kind}"] = state[emb + f"timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = state[emb + f"timestep_embedder.linear_2.{kind}"]
        for i in range(depth):
            ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
            out[ours + f"adaLN_modulation.1.{kind}"] = state[theirs + f"norm1.linear.{kind}"]
            out[ours + f"attn.qkv.{kind}"] = torch.cat(
                [state[theirs + f"attn1.to_{n}.{kind}"] for n in "qkv"], dim=0
            )
            out[ours + f"attn.proj.{kind}"] = state[theirs + f"attn1.to_out.0.{kind}"]
            out[ours + f"mlp.fc1.{kind}"] = state[theirs + f"ff.net.0.proj.{kind}"]
            out[ours + f"mlp.fc2.{kind}"] = state[theirs + f"ff.net.2.{kind}"]
    return out


def _check_shared_embedders(state: Mapping[str, torch.Tensor], depth: int) -> None:
    """Every block's time/label embedder copy must equal block 0's: our DiT has one embedder."""
    emb = ".norm1.emb."
    names = sorted(k.split(emb, 1)[1] for k in state if k.startswith("transformer_blocks.0" + emb))
    differ: dict[int, list[str]] = {}
    for i in range(1, depth):
        for name in names:
            theirs = state.get(f"transformer_blocks.{i}{emb}{name}")
            if theirs is None or not torch.equal(theirs, state[f"transformer_blocks.0{emb}{name}"]):
                parts = differ.setdefault(i, [])
                parts += [] if name.split(".")[0] in parts else [name.split(".")[0]]
    if differ:
        listing = "; ".join(f"block {i}: {', '.join(n)}" for i, n in differ.items())
        raise CheckpointError(
            f"diffusers DiT: the time/label embedders of transformer_blocks {', '.join(map(str, differ))} "
            f"differ from block 0's ({listing}). Our DiT shares one embedder across blocks, so dropping "
            "these copies would change the outputs; expected every block's copy equal to block 0's (as in "
            "a conversion of an official DiT checkpoint). Run this model with diffusers itself."
        )


def diffusers_config(model: DiT) -> dict:
    """Constructor arguments of the ``DiTTransformer2DModel`` equivalent to ``model``."""
    plain = all(isinstance(b.norm1, nn.LayerNorm) and isinstance(b.mlp, Mlp) for b in model.blocks)
    if not isinstance(model, DiT) or not plain or model.feat_rope is not None:
        raise InputError("only a plain DiT (LayerNorm, GELU MLP, no RoPE) has a diffusers equivalent")
    return dict(
        num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size // model.num_heads,
        in_channels=model.in_channels, out_channels=model.out_channels, num_layers=model.depth,
        sample_size=model.input_size, patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes,
        norm_eps=model.norm_eps,
    )  # fmt: skip


def to_diffusers(model: DiT):
    """A ``diffusers.DiTTransformer2DModel`` holding ``model``'s weights."""
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel(**diffusers_config(model))
    theirs.load_state_dict(dit_to_diffusers_state_dict(model.state_dict()), strict=True)
    return theirs


def from_diffusers(theirs, **kwargs) -> DiT:
    """Our DiT holding a ``DiTTransformer2DModel``'s weights, set to reproduce its outputs exactly
    (``time_freq_shift=1``; pass ``time_freq_shift=0`` for the DiT paper's frequencies; ``norm_eps``
    is the model's ``config.norm_eps``).  A model whose per-block embedder copies differ from block 0's
    is refused (``CheckpointError`` naming the blocks): our DiT shares one embedder."""
    cfg = theirs.config
    in_channels = cfg.in_channels
    out_channels = cfg.out_channels or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise InputError(f"out_channels {out_channels} must be in_channels ({in_channels}) or twice that")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    model = DiT(
        input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=in_channels, hidden_size=hidden,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads, num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * in_channels,
        **{"time_freq_shift": 1, "norm_eps": cfg.norm_eps, **kwargs},
    )  # fmt: skip
    state = dit_from_diffusers_state_dict(theirs.state_dict(), cfg.sample_size, hidden)
    load_into(model, state, strict=True)
    return model

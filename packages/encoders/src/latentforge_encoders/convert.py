"""Weights for the ViT family from the layouts they are published in.

* **ours**: a safetensors file written by ``save_encoder`` (config in the metadata);
* **official DINOv2** ``.pth`` (``dinov2_vitb14_reg4_pretrain.pth`` …; also DINO v1): the same
  parameter names as ours, plus ``mask_token`` (dropped) and, for ``block_chunks > 0``, chunked
  ``blocks.<chunk>.<i>.`` keys (unchunked);
* **timm**'s DINOv2 ViTs (``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``): the official names
  but ``reg_token`` for the registers, a ``pos_embed`` without the CLS slot in the register models
  (``no_embed_class``: the CLS token gets no position; a zero slot is added) and the giant's packed
  SwiGLU as ``mlp.fc1``/``mlp.fc2`` (``fc1`` twice as wide as ``fc2``'s input); a classifier
  ``head`` is dropped.  A file with timm's own names resizes its position grid as timm does
  (bicubic, antialiased); timm's non-register models share the official names, so theirs is the
  official layout's default;
* **Hugging Face** model folders (``config.json`` + safetensors or ``pytorch_model.bin``) of
  ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``SiglipVisionModel`` / ``SiglipModel`` (SigLIP2 at
  fixed resolution) and ``ViTMAEModel`` / ``ViTMAEForPreTraining``, in the layout on the hub and in
  the renamed layout of transformers 5 (``q_proj``/``o_proj``/``gate_proj``).  Separate q/k/v are
  fused into ``qkv``.  Parts that are not the vision trunk are dropped, by name: the text tower,
  MAE's decoder, SigLIP's attention-pool head, classifier heads, DINOv2's mask token.

``hf:<repo>`` downloads a folder through ``huggingface_hub`` (online use only; tests never do).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from latentforge_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    load_state_file,
    save_checkpoint,
)
from latentforge_core.errors import MissingFileError
from latentforge_core.protocols import Preprocessing
from latentforge_encoders.encoder import FeatureSpec, FrozenEncoder, Preset, apply_preset, resolve_preset
from latentforge_encoders.vit import VisionTransformer

FORMAT_KEY = "latentforge_encoder"
HF_ALLOW = ["config.json", "preprocessor_config.json", "*.safetensors"]
HF_TRUNK_PREFIXES = ("", "vision_model.", "vit.", "dinov2.", "dinov2_with_registers.")
HF_DROPPED = re.compile(r"^(embeddings\.mask_token|embeddings\.position_ids|head\..*)$")

# Hub layout and transformers-5 layout → ours, applied in order to each trunk key.
HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings?(\.weight)?$", "pos_embed"),
    (r"^embeddings\.patch_embeddings?(\.projection)?\.", "patch_embed.proj."),
    (r"^(?:encoder\.layers?|layers)\.(\d+)\.", r"blocks.\1."),
    (r"\.(?:layernorm_before|layer_norm1)\.", ".norm1."),
    (r"\.(?:layernorm_after|layer_norm2)\.", ".norm2."),
    (r"\.(?:attention\.attention\.query|attention\.q_proj|self_attn\.q_proj)\.", ".attn.q."),
    (r"\.(?:attention\.attention\.key|attention\.k_proj|self_attn\.k_proj)\.", ".attn.k."),
    (r"\.(?:attention\.attention\.value|attention\.v_proj|self_attn\.v_proj)\.", ".attn.v."),
    (r"\.(?:attention\.output\.dense|attention\.o_proj|self_attn\.out_proj)\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.(?:weights_in)\.", ".mlp.w12."),
    (r"\.mlp\.(?:weights_out|down_proj)\.", ".mlp.w3."),
    (r"^(?:layernorm|post_layernorm)\.", "norm."),
]
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
FAMILY_INPUT = {  # processor defaults (resize, mean, std) when a folder has no preprocessor_config.json
    "dinov2": ("bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dinov2_with_registers": ("bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip_vision_model": ("bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit_mae": ("bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


#################################################################################
#                               State-dict layouts                              #
#################################################################################


def from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict (hub or transformers-5 names, any head on top) → ours."""
    prefix = next(
        (p for p in HF_TRUNK_PREFIXES if any(k.startswith(p + "embeddings.") for k in state_dict)), None
    )
    if prefix is None:
        raise CheckpointError(
            "not a Hugging Face ViT checkpoint: no 'embeddings.*' keys (under any of the prefixes "
            f"{[p for p in HF_TRUNK_PREFIXES if p]}); first keys: {sorted(state_dict)[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # text tower, MAE decoder, classifier: not part of the trunk
        key = key[len(prefix) :]
        if HF_DROPPED.match(key):
            continue
        for pattern, repl in HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if "pos_embed" in out and out["pos_embed"].ndim == 2:  # SigLIP stores an nn.Embedding table
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    return _fuse(out)


def _fuse(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate q/k/v → ``attn.qkv``; transformers-5 gate/up → ``mlp.w12`` (gate first)."""
    for key in [k for k in sd if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        base, kind = key.rsplit(".attn.q.", 1)
        parts = [sd.pop(f"{base}.attn.{n}.{kind}") for n in "qkv"]
        sd[f"{base}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    for key in [k for k in sd if re.search(r"\.mlp\.gate_proj\.(weight|bias)$", k)]:
        base, kind = key.rsplit(".mlp.gate_proj.", 1)
        sd[f"{base}.mlp.w12.{kind}"] = torch.cat([sd.pop(key), sd.pop(f"{base}.mlp.up_proj.{kind}")], dim=0)
    return sd


def from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official DINOv2 (or timm / DINO v1) layout → ours: drop ``mask_token`` and a classifier
    ``head``, unchunk blocks; timm's ``reg_token``, packed SwiGLU and CLS-less ``pos_embed`` (see the
    module notes) become ours."""
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token" or key.startswith("head."):
            continue
        key = "register_tokens" if key == "reg_token" else key
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    for key in [k for k in out if k.endswith(".mlp.fc1.weight")]:
        base = key.removesuffix(".fc1.weight")
        fc2 = out.get(base + ".fc2.weight")
        if fc2 is not None and out[key].shape[0] == 2 * fc2.shape[1]:  # timm's SwiGLUPacked
            for old, new in (("fc1", "w12"), ("fc2", "w3")):
                for kind in ("weight", "bias"):
                    if f"{base}.{old}.{kind}" in out:
                        out[f"{base}.{new}.{kind}"] = out.pop(f"{base}.{old}.{kind}")
    pos = out.get("pos_embed")
    if pos is not None and "cls_token" in out and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # timm's no_embed_class: the grid only (1 + side² is never a square); the CLS slot is zero
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    return out


def to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout → ours, detected from the key names."""
    if "patch_embed.proj.weight" in state_dict or any(k.startswith("blocks.") for k in state_dict):
        return from_official(state_dict)
    return from_hf(state_dict)


#################################################################################
#                                 Configurations                                #
#################################################################################


def vit_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """``VisionTransformer`` arguments from a transformers ``config.json`` (a dict)."""
    kind = config.get("model_type")
    if "vision_config" in config:  # a full SigLIP model: take its vision tower
        config, kind = (
            config["vision_config"],
            config["vision_config"].get("model_type", "siglip_vision_model"),
        )
    if kind not in FAMILY_INPUT:
        raise CheckpointError(
            f"unsupported Hugging Face model_type {kind!r}; expected one of {sorted(FAMILY_INPUT)} "
            "(fixed-resolution SigLIP2 checkpoints use the 'siglip' types)"
        )
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"unsupported hidden_act {act!r}; expected one of {sorted(HF_ACTIVATIONS)}")
    dim = config.get("hidden_size", 768)
    vit = dict(
        image_size=config.get("image_size", 224), patch_size=config.get("patch_size", 16),
        in_chans=config.get("num_channels", 3), embed_dim=dim, depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12), qkv_bias=config.get("qkv_bias", True),
        norm_eps=config.get("layer_norm_eps", 1e-12 if kind == "vit_mae" else 1e-6), act=HF_ACTIVATIONS[act],
    )  # fmt: skip
    if kind.startswith("dinov2"):
        vit.update(
            mlp_ratio=config.get("mlp_ratio", 4), layerscale_init=config.get("layerscale_value", 1.0),
            ffn="swiglu" if config.get("use_swiglu_ffn", False) else "mlp",
            num_registers=config.get("num_register_tokens", 0) if kind == "dinov2_with_registers" else 0,
            pos_antialias=kind == "dinov2_with_registers",
        )  # fmt: skip
    else:
        vit.update(mlp_hidden_dim=config.get("intermediate_size", 4 * dim), class_token=kind == "vit_mae")
    return vit


def vit_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the architecture of an official-layout state dict (head dim 64, as DINO/DINOv2 use)."""
    proj = sd["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token = "cls_token" in sd
    side = round((sd["pos_embed"].shape[1] - int(class_token)) ** 0.5)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    return dict(
        image_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=dim // 64, mlp_hidden_dim=hidden, ffn="swiglu" if swiglu else "mlp",
        num_registers=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        class_token=class_token, layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else None,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )  # fmt: skip


#################################################################################
#                                   Loading                                     #
#################################################################################


@attrs.frozen
class Source:
    """A checkpoint read from disk: our state dict plus what its files say about it."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # "ours" | "official" | "timm" | "hf"
    vit_config: dict[str, Any] | None  # None when only the shapes tell
    preprocessing: Preprocessing | None
    description: str
    spec: FeatureSpec | None = None  # saved with our format


def read_source(source: str | os.PathLike) -> Source:
    """Read ``source`` (our file, an official ``.pth``, an HF folder, or ``hf:<repo>``)."""
    if isinstance(source, str) and source.startswith("hf:"):
        from huggingface_hub import snapshot_download

        source = snapshot_download(source[3:], allow_patterns=HF_ALLOW)
    path = Path(source)
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise MissingFileError(
            f"encoder checkpoint not found: {path} (expected a file, a folder, or 'hf:<repo>')"
        )
    if path.suffix == ".safetensors":
        sd, config = load_checkpoint(path)
        if FORMAT_KEY in config:
            ours = config[FORMAT_KEY]
            pre = Preprocessing(**{**ours["preprocessing"], "mean": tuple(ours["preprocessing"]["mean"]),
                                   "std": tuple(ours["preprocessing"]["std"]),
                                   "value_range": tuple(ours["preprocessing"]["value_range"])})  # fmt: skip
            spec = FeatureSpec(**ours["spec"])
            return Source(
                sd, "ours", ours["vit"], pre, f"{path} (latentforge encoder {ours.get('name')!r})", spec
            )
    else:
        sd = load_state_file(path)
        for wrapper in ("model", "teacher", "state_dict"):  # training checkpoints nest the weights
            if wrapper in sd and isinstance(sd[wrapper], Mapping):
                sd = dict(sd[wrapper])
    ours = to_ours(sd)
    layout = "official" if "patch_embed.proj.weight" in sd else "hf"
    config = vit_config_from_state_dict(ours) if "patch_embed.proj.weight" in ours else None
    cls_less = "pos_embed" in sd and ours["pos_embed"].shape != sd["pos_embed"].shape
    if layout == "official" and ("reg_token" in sd or cls_less):
        layout = "timm"
        if config is not None:
            config["pos_antialias"] = True  # timm's resample_abs_pos_embed: bicubic, antialiased
    return Source(ours, layout, config, None, f"{path} ({layout} layout)")


def _read_hf_folder(path: Path) -> Source:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
    config = json.loads(config_file.read_text())
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        sd.update(load_state_file(file))
    vit = vit_config_from_hf(config)
    kind = config.get("vision_config", config).get("model_type", config.get("model_type"))
    resize, mean, std = FAMILY_INPUT[kind]
    size = vit["image_size"]  # without a processor file: the resolution the model was built for
    processor = path / "preprocessor_config.json"
    if processor.is_file():  # the evaluation crop (224 for DINOv2, whose position grid is 518 px)
        proc = json.loads(processor.read_text())
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
        resize = PIL_RESAMPLE.get(proc.get("resample"), resize)
        size = (proc.get("crop_size") or proc.get("size") or {}).get("height", size)
    pre = Preprocessing(input_size=size, mean=mean, std=std, resize=resize)
    return Source(from_hf(sd), "hf", vit, pre, f"{path} (Hugging Face {config.get('model_type')!r})")


ARCH_FIELDS = ("embed_dim", "depth", "patch_size", "num_registers", "class_token", "ffn")


def load_weights(vit: VisionTransformer, source: str | os.PathLike | Source, what: str = "encoder") -> None:
    """Load ``source`` into ``vit`` strictly; a checkpoint of another architecture is refused with
    the fields that differ (then any remaining key or shape problem, by name)."""
    src = source if isinstance(source, Source) else read_source(source)
    if src.vit_config is not None:
        theirs = {**VisionTransformer.__init__.__kwdefaults__, **src.vit_config}
        diff = [f"{f}: checkpoint {theirs[f]!r} vs {what} {vit.config[f]!r}" for f in ARCH_FIELDS
                if theirs[f] != vit.config[f]]  # fmt: skip
        if diff:
            raise CheckpointError(
                f"{src.description} is a checkpoint of another architecture than {what}: " + "; ".join(diff)
            )
    load_into(vit, src.state_dict, strict=True)


def load_encoder(
    source: str | os.PathLike,
    features: str | FeatureSpec | None = None,
    frozen: bool = True,
    check_finite: bool = False,
) -> FrozenEncoder:
    """A ``FrozenEncoder`` whose architecture and preprocessing come from the checkpoint itself."""
    src = read_source(source)
    if src.vit_config is None:
        raise CheckpointError(
            f"{src.description}: cannot tell the architecture; build a registered encoder instead"
        )
    vit = VisionTransformer(**src.vit_config)
    load_weights(vit, src)
    pre = src.preprocessing or Preprocessing(
        input_size=vit.grid_size * vit.patch_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    preset = Preset(src.spec) if features is None and src.spec is not None else resolve_preset(features)
    pre = apply_preset(vit, pre, preset)
    name = Path(str(source)).name
    return FrozenEncoder(vit, pre, preset.spec, frozen=frozen, check_finite=check_finite, name=name)


def save_encoder(encoder: FrozenEncoder, path: str | os.PathLike) -> Path:
    """Our format: the ViT's weights, with its config, preprocessing and spec in the metadata."""
    config = {
        FORMAT_KEY: {
            "name": encoder.name,
            "vit": {**encoder.vit.config, "pos_antialias": encoder.vit.pos_antialias,
                    "pos_offset": encoder.vit.pos_offset},
            "preprocessing": encoder.preprocessing.to_dict(),
            "spec": encoder.spec.to_dict(),
        }
    }  # fmt: skip
    return save_checkpoint(encoder.vit.state_dict(), path, config)

"""Layers shared by the DiT family (DiT, LightningDiT, DiT-DH).

Module and parameter names follow the released checkpoints (``x_embedder.proj``, ``attn.qkv``,
``mlp.fc1`` / ``mlp.w12``, ``adaLN_modulation.1``, ``feat_rope.freqs_cos`` …) so official state dicts
load strictly.  The forward passes fuse what the references compute in separate steps (one qkv
GEMM, ``addcmul`` for modulation and gated residuals, SDPA through core's ``attention``), and
every linear runs its fp32 CPU GEMMs on oneDNN (``linear``).  Attention, feed-forwards, RMSNorm,
2-D RoPE and the sin-cos table are core's transformer kit (``latentforge_core.transformer``),
re-exported here under the names the DiT code uses.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn as nn
from einops import rearrange

from latentforge_core.errors import InputError, InputTypeError, checking_values
from latentforge_core.linear import Linear, linear
from latentforge_core.transformer import (
    Attention,
    Mlp,
    RMSNorm,
    RoPE2D,
    SwiGLU,
    gelu_tanh,
    sincos_pos_embed_2d,
)

__all__ = [  # the kit's parts as the DiT family names them, beside this module's own layers
    "AdaLNBlock",
    "Attention",
    "DiTBackbone",
    "FinalLayer",
    "FourierTimestepEmbedder",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "RoPE2D",
    "SwiGLU",
    "TimestepEmbedder",
    "affine_free_layernorm",
    "check_inputs",
    "compile_blocks",
    "gelu_tanh",
    "init_dit_weights",
    "modulate",
    "sincos_pos_embed_2d",
    "timestep_features",
    "unpatchify",
]


#################################################################################
#                   Embedding layers for patches, timesteps and labels          #
#################################################################################
class PatchEmbed(nn.Module):
    """Non-overlapping ``p × p`` patches → tokens; ``proj`` is stored as a conv (timm's layout)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A conv with kernel = stride is a GEMM on (c p q)-flattened patches; as F.linear it is faster.
        p = self.patch_size
        patches = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # B, T, C·p²
        return linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # B, T, D


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, freq_shift: int = 0):
    """Sinusoidal features ``[cos, sin]`` of a (possibly fractional) time, as in DiT/GLIDE.

    ``freq_shift`` = 1 reproduces diffusers' DiT port, whose frequencies divide by ``dim/2 − 1``
    where the DiT code divides by ``dim/2``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # B, half
    return torch.cat([args.cos(), args.sin()], dim=-1)  # B, dim


class TimestepEmbedder(nn.Module):
    """Scalar time → vector: 256 sinusoidal features then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            Linear(frequency_size, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_size, freq_shift=self.freq_shift)  # B, 256
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # B, D


class FourierTimestepEmbedder(TimestepEmbedder):
    """RAE's time embedding (DiT-DH and RAE's LightningDiT): ``[sin, cos](2π·t·W)`` with a frozen
    W ~ N(0, 1) of 256 entries, stored in checkpoints as ``t_embedder.W``, then the same SiLU MLP as
    DiT (input 512)."""

    def __init__(self, hidden_size: int, num_frequencies: int = 256):
        super().__init__(hidden_size, frequency_size=2 * num_frequencies)
        self.W = nn.Parameter(torch.randn(num_frequencies), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * t.float()[:, None] * self.W[None].float()  # B, 256
        feats = torch.cat([args.sin(), args.cos()], dim=-1)  # B, 512
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # B, D


class LabelEmbedder(nn.Module):
    """Class label → vector; row ``num_classes`` is the null class that CFG uses.

    In training each label is replaced by the null class with probability ``dropout_prob``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)  # B, D


#################################################################################
#                        adaLN-Zero block and final layer                       #
#################################################################################
def affine_free_layernorm(dim: int, eps: float = 1e-6) -> nn.Module:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x·(1 + scale) + shift, one pass


def _per_token(mod: torch.Tensor) -> torch.Tensor:
    """Modulation from one vector per image [B, k] broadcasts over tokens as [B, 1, k]."""
    return mod.unsqueeze(1) if mod.ndim == 2 else mod


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by a condition.

    The condition is one vector per image ``[B, D]`` (DiT) or one per token ``[B, N, D]`` (the DDT
    head of DiT-DH).  ``rmsnorm``/``swiglu``/``qk_norm`` select LightningDiT's variants.
    ``norm_eps`` is the epsilon of the second norm (before the MLP), diffusers' ``config.norm_eps``;
    the first stays at DiT's 1e-6, as in diffusers, whose ``AdaLayerNormZero`` fixes it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        rmsnorm: bool = False,
        swiglu: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        norm = RMSNorm if rmsnorm else affine_free_layernorm
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = norm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, int(2 / 3 * hidden)) if swiglu else Mlp(dim, hidden, act="gelu_tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RoPE2D | None = None) -> torch.Tensor:
        mods = _per_token(self.adaLN_modulation(c)).chunk(6, dim=-1)  # 6 × [B, 1|N, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # B, N, D


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) on the last tokens, then a linear map to patch pixels."""

    def __init__(self, dim: int, out_features: int, *, rmsnorm: bool = False):
        super().__init__()
        self.norm_final = RMSNorm(dim) if rmsnorm else affine_free_layernorm(dim)
        self.linear = Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _per_token(self.adaLN_modulation(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # B, N, p²·C_out


#################################################################################
#                       Initialisation and input checks                         #
#################################################################################
def init_dit_weights(model: nn.Module, *, xavier_linears: bool = True) -> None:
    """DiT's initialisation: xavier linears (optional, off in DiT-DH), patch convs as flattened
    linears, label table N(0, 0.02), t-MLP N(0, 0.02), every adaLN output and the final linear zero,
    and the frozen ``pos_embed`` set to the sin-cos table of the token grid."""
    for module in model.modules():
        if xavier_linears and isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, PatchEmbed):
            nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))
            nn.init.zeros_(module.proj.bias)
        elif isinstance(module, LabelEmbedder):
            nn.init.normal_(module.embedding_table.weight, std=0.02)
    for module in model.modules():
        if isinstance(module, TimestepEmbedder):
            nn.init.normal_(module.mlp[0].weight, std=0.02)
            nn.init.normal_(module.mlp[2].weight, std=0.02)
        elif isinstance(module, (AdaLNBlock, FinalLayer)):
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
        if isinstance(module, FinalLayer):
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)
    grid = model.input_size // model.patch_size
    model.pos_embed.data.copy_(sincos_pos_embed_2d(model.hidden_size, grid).unsqueeze(0))


def compile_blocks(model: nn.Module, **kwargs) -> None:
    """``torch.compile`` every block and the final layer in place, as LightningDiT's code does: it
    fuses norms, modulation, activations and gated residuals.  The first forward compiles."""
    for module in (*model.blocks, model.final_layer):
        module.compile(**kwargs)


_Backbone = TypeVar("_Backbone", bound="DiTBackbone")


class DiTBackbone(nn.Module):
    """What DiT, LightningDiT and DiT-DH share around their blocks: DiT's initialisation (with the
    sin-cos ``pos_embed``) and ``compile_blocks``.  A subclass sets ``blocks``, ``final_layer``,
    ``pos_embed``, ``input_size``, ``patch_size`` and ``hidden_size``."""

    xavier_linears = True  # DiT's xavier pass over the linears (RAE's DiT-DH keeps PyTorch's init)

    def initialize_weights(self) -> None:
        init_dit_weights(self, xavier_linears=self.xavier_linears)

    def compile_blocks(self: _Backbone, **kwargs) -> _Backbone:
        """Compile the blocks and final layer with ``torch.compile`` (kwargs passed on); returns self."""
        compile_blocks(self, **kwargs)
        return self


def check_inputs(model: nn.Module, x: torch.Tensor, t, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``(x, t, y)`` for a DiT-family backbone; returns ``t`` and ``y`` as ``[B]`` tensors.

    ``t`` may be a Python number or a 0-d tensor (broadcast to the batch); ``y=None`` means the
    null class for every sample.
    """
    name = type(model).__name__
    c, s = model.in_channels, model.input_size
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != c or tuple(x.shape[-2:]) != (s, s):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise InputError(f"{name} expects latents of shape [B, {c}, {s}, {s}], got {got}")
    if not x.is_floating_point():
        raise InputTypeError(f"{name} expects floating-point latents, got {x.dtype}")
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise InputError(f"{name} expects one time per sample, shape [{b}], got {tuple(t.shape)}")
    if y is None:
        y = torch.full((b,), model.num_classes, dtype=torch.long, device=x.device)
    y = torch.as_tensor(y, device=x.device)
    if y.shape != (b,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(
            f"{name} expects integer class labels of shape [{b}], got {y.dtype} {tuple(y.shape)}"
        )
    if checking_values() and b and (int(y.min()) < 0 or int(y.max()) > model.num_classes):
        raise InputError(
            f"{name} class labels must lie in [0, {model.num_classes}] ({model.num_classes} = null "
            f"class for guidance), got values in [{int(y.min())}, {int(y.max())}]"
        )
    if checking_values() and not torch.isfinite(x).all():
        raise InputError(f"{name} got latents containing NaN or inf")
    if checking_values() and not torch.isfinite(t).all():
        raise InputError(f"{name} got times containing NaN or inf")
    return t, y


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    side = math.isqrt(x.shape[1])
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=patch_size, q=patch_size, c=channels)

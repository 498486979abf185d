"""The transformer kit: the parts every transformer in latentforge is built from, defined once.

The ViT encoders, the DiT family and the token models (GPT, MaskGIT, DiGIT) all use this attention,
these feed-forwards, norms, position tables and rotary embeddings; they differ only in the switches
their checkpoints need (biases, activation, QK-norm, a rotary hook, a KV cache).  Parameter names are
the ones of the released checkpoints (``qkv``, ``proj``, ``fc1``/``fc2``, ``w12``/``w3``, ``weight``,
``freqs_cos``/``freqs_sin``), so official state dicts load with the same keys into every model.
Every linear is core's :class:`~latentforge_core.linear.Linear` (oneDNN GEMMs for fp32 on CPU),
every attention goes through core's :func:`~latentforge_core.attention.attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentforge_core.attention import attention, split_heads
from latentforge_core.errors import InputError
from latentforge_core.linear import Linear, linear

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "KVCache",
    "Mlp",
    "RMSNorm",
    "RoPE2D",
    "RotaryEmbedding",
    "SwiGLU",
    "gelu_tanh",
    "no_grad_needed",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
]


def no_grad_needed(*tensors: torch.Tensor) -> bool:
    """True when autograd records nothing for ``tensors`` (so they may be overwritten in place)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


#################################################################################
#                                  Activations                                  #
#################################################################################
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation.  Under ``torch.compile`` it is written as the same function
    ``x·σ(2z)`` (as ``(1 + tanh z)/2 = σ(2z)``): inductor's CPU code then runs an exp where it would
    run a slower vector tanh (fused forward + backward 15% faster); eager keeps PyTorch's one kernel."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2·sqrt(2/π)
    return F.gelu(x, approximate="tanh")


Activation = Callable[[torch.Tensor], torch.Tensor]
ACTIVATIONS: dict[str, Activation] = {"gelu": F.gelu, "gelu_tanh": gelu_tanh}
# In-place twins, used when no gradient is recorded: a frozen model's hidden activations are the
# largest tensors of its forward, and writing over them spares a fresh allocation per block.
_ACTIVATIONS_: dict[str, Activation] = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_tanh": functools.partial(torch.ops.aten.gelu_, approximate="tanh"),
}


#################################################################################
#                            Sin-cos position tables                            #
#################################################################################
def _sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin, cos]`` of ``pos·ω_k``, ``ω_k = 10000^(-k / (dim/2))``, in float64: ``[len(pos), dim]``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # dim/2
    angles = pos.reshape(-1, 1) * omega  # P, dim/2
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # P, dim


def sincos_pos_embed_1d(dim: int, positions: int | torch.Tensor) -> torch.Tensor:
    """MAE's fixed 1-D sin-cos table ``[P, dim]`` for positions ``0 … P-1`` (or the given ones)."""
    if dim % 2:
        raise InputError(f"sin-cos position embedding needs an even width, got {dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions)
    return _sincos(dim, positions.to(torch.float64)).float()


def sincos_pos_embed_2d(dim: int, grid: int, extra_tokens: int = 0) -> torch.Tensor:
    """MAE/DiT's fixed 2-D sin-cos table ``[extra_tokens + grid², dim]``, tokens row-major.

    The first half of the channels encodes the column index and the second half the row index (the
    references build their grid with ``meshgrid(w, h)``); ``extra_tokens`` zero rows lead (MAE's CLS).
    """
    if dim % 4:
        raise InputError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")
    table = torch.cat([_sincos(dim // 2, col), _sincos(dim // 2, row)], dim=1)  # T, dim
    return torch.cat([table.new_zeros(extra_tokens, dim), table]).float()  # extra + T, dim


#################################################################################
#                               Rotary embeddings                               #
#################################################################################
class RotaryEmbedding(nn.Module):
    """1-D rotary positions in the half-split layout that Llama's q/k weights in transformers use.

    Rotating ``[x1, x2]`` gives ``x·cos + [-x2, x1]·sin = x·cos + roll(x, d/2)·[-sin, sin]``: the
    sign lives in the table, so a rotation is a roll and two multiplies (q and k in one pass).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # P, Dh/2
        self.register_buffer("cos", torch.cat((angles, angles), dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((-angles.sin(), angles.sin()), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``x [..., N, Dh]`` at positions ``start .. start + N``."""
        n, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[start : start + n].to(x.dtype), self.sin[start : start + n].to(x.dtype)
        return torch.addcmul(x * cos, x.roll(half, dims=-1), sin)  # ..., N, Dh


class RoPE2D(nn.Module):
    """2-D rotary embedding of EVA-02 / LightningDiT over a ``grid × grid`` token map.

    Half of each head's channels rotate with the row index, the other half with the column index;
    inside each half, frequency ``10000^(-2k / (head_dim/2))`` turns the adjacent pair (2k, 2k+1).
    The cos/sin tables are buffers because the released checkpoints store them.
    """

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise InputError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)  # half/2
        angles = torch.arange(grid).float()[:, None] * freqs  # grid, half/2
        angles = angles.repeat_interleave(2, dim=-1)  # grid, half
        row = angles[:, None, :].expand(grid, grid, half)
        col = angles[None, :, :].expand(grid, grid, half)
        table = torch.cat([row, col], dim=-1).reshape(grid * grid, head_dim)  # T, head_dim
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``x [B, H, T, Dh]`` over the whole grid (``start`` is the attention's hook argument: 0)."""
        if start:
            raise InputError(f"2-D RoPE covers a fixed token grid; it has no offset (got start={start})")
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (-x_odd, x_even)
        return torch.addcmul(x * self.freqs_cos, rotated, self.freqs_sin)  # B, H, T, Dh


#################################################################################
#                            Norm and key/value cache                           #
#################################################################################
class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, computed in fp32 then cast back before the scale, as
    LightningDiT's and transformers' Llama (``weight · normed.to(dtype)``); in fp32 it is
    ``nn.RMSNorm`` to the bit."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x)
        return normed * self.weight  # ..., D


class KVCache:
    """Keys and values of every layer, preallocated and filled left to right while decoding."""

    def __init__(
        self,
        depth: int,
        batch: int,
        heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (depth, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already written by every layer

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise InputError(f"the KV cache holds {self.max_len} positions; writing up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # B, H, end, Dh


#################################################################################
#                                   Attention                                   #
#################################################################################
class Attention(nn.Module):
    """Multi-head self-attention: one fused ``qkv`` projection, core's ``attention``, ``proj``.

    The switches are what the checkpoint families need: biases (fairseq, ViT, DiT) or none (Llama),
    RMSNorm on q and k over the head dim (LightningDiT's QK-norm), a rotary hook, a KV cache
    (token decoding, ``causal`` aligned to the cache's end).  ``split_qkv_on_cpu`` (ViT encoders)
    computes q, k, v as three ``[B, N, D]`` products on CPU: a fused ``[B, N, 3D]`` output is mapped
    fresh on every call, and inference there pays for it.  ``attend`` replaces core's ``attention``
    (same signature), e.g. by one that a model module looks up at call time.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        split_qkv_on_cpu: bool = False,
        attend: Callable[..., torch.Tensor] | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.split_qkv_on_cpu = split_qkv_on_cpu
        self.attend = attend
        head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim, bias=proj_bias)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v ``[B, H, N, Dh]`` of ``x [B, N, D]`` (views of one fused output, or three products)."""
        if self.split_qkv_on_cpu and x.device.type == "cpu":
            dim = self.proj.in_features
            bias = self.qkv.bias.split(dim) if self.qkv.bias is not None else (None,) * 3
            return tuple(
                linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # B, H, N, Dh
                for w, b in zip(self.qkv.weight.split(dim), bias, strict=True)
            )
        return split_heads(self.qkv(x), self.num_heads)  # B, H, N, Dh each

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | RoPE2D | None = None,
        *,
        start: int = 0,
        cache: KVCache | None = None,
        layer: int = 0,
        causal: bool = False,
    ) -> torch.Tensor:
        """``x [B, N, D]`` at positions ``start …`` → ``[B, N, D]``; ``cache`` keeps ``layer``'s keys."""
        if isinstance(rope, RotaryEmbedding) and not self.qk_norm:
            # 1-D rotary turns q and k in one pass, over a [2, B, H, N, Dh] view of the fused output
            qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # 3, B, H, N, Dh
            (q, k), v = rope(qkv[:2], start).unbind(0), qkv[2]
        else:
            q, k, v = self.heads(x)  # B, H, N, Dh each
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q, start), rope(k, start)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # B, H, start+N, Dh
        if q.dtype != v.dtype or k.dtype != v.dtype:  # fp32 norm/RoPE under autocast: back to v's dtype
            q, k = q.type_as(v), k.type_as(v)
        attend = attention if self.attend is None else self.attend
        out = attend(q, k, v, is_causal=causal and q.shape[2] > 1)  # B, H, N, Dh
        return self.proj(out.transpose(1, 2).flatten(2))  # B, N, D


#################################################################################
#                                 Feed-forwards                                 #
#################################################################################
class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with exact GELU (ViT, fairseq) or tanh-approximated GELU (DiT, SigLIP).

    When autograd records nothing (a frozen encoder, sampling), the activation overwrites ``fc1``'s
    output in place; under ``torch.compile`` the functional form is kept (``gelu_tanh``'s fast one).
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise InputError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, dim, bias=bias)
        self.act, self.act_ = ACTIVATIONS[act], _ACTIVATIONS_[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # B, N, hidden
        if no_grad_needed(h) and not torch.compiler.is_compiling():
            return self.fc2(self.act_(h))  # B, N, D
        return self.fc2(self.act(h))  # B, N, D


class SwiGLU(nn.Module):
    """``w3(silu(gate) · value)`` with gate and value fused in ``w12``, gate half first (LightningDiT,
    DINOv2-g; Llama's gate/up projections concatenated)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = Linear(dim, 2 * hidden, bias=bias)
        self.w3 = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # B, N, hidden each
        return self.w3(F.silu(gate) * value)  # B, N, D

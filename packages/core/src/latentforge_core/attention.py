"""The one attention function every transformer in latentforge calls.

xformers' memory-efficient kernel is used when it is installed and the tensors live on CUDA;
everywhere else PyTorch's ``scaled_dot_product_attention`` runs (flash / efficient / math, picked
by PyTorch).  Tests pin a backend explicitly to compare paths.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

from latentforge_core.errors import InputError, StateError

Backend = Literal["auto", "sdpa", "xformers", "math"]
BACKENDS = ("auto", "sdpa", "xformers", "math")


@functools.cache
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # an optional extra: any failure to import means "not usable"
        return False
    return True


def _math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # B H N M
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.softmax(dim=-1) @ v  # B H N D


def _xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    import xformers.ops as xops

    bias = None
    if is_causal:
        bias = xops.LowerTriangularMask()
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # xformers wants [B, N, H, D]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused ``[B, N, 3·H·D]`` projection → q, k, v views ``[B, H, N, D]``.

    Split along channels first: the gradients of the three views then concatenate back into the
    projection's gradient in one contiguous copy, where unbinding a ``(three h d)`` rearrange
    stacks them and transposes them twice.
    """
    return tuple(t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """The backend that ``attention`` will actually run for tensors on ``device``."""
    if backend not in BACKENDS:
        raise InputError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers" and not (device.type == "cuda" and xformers_available()):
        raise StateError(
            "attention backend 'xformers' needs the xformers package and CUDA tensors "
            f"(xformers installed: {xformers_available()}, device: {device}); "
            "install the 'xformers' extra or use backend='sdpa'"
        )
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, N, D]`` tensors, returns ``[B, H, N, D]``.

    ``attn_mask`` is boolean (True = attend) or additive, broadcastable to ``[B, H, N, M]``.
    ``is_causal`` with ``N < M`` aligns the mask to the end (the KV-cache convention).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InputError(
            f"attention expects 4-D [B, H, N, D] tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if is_causal and attn_mask is not None:
        raise InputError("pass either attn_mask or is_causal=True, not both")
    chosen = resolve_backend(backend, q.device)
    if chosen == "xformers":
        return _xformers_attention(q, k, v, attn_mask, is_causal, scale)
    if chosen == "math" or (is_causal and q.shape[-2] != k.shape[-2]):
        # SDPA's is_causal aligns the mask to the top-left corner; a KV cache needs bottom-right.
        return _math_attention(q, k, v, attn_mask, is_causal, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

"""Linear layers whose fp32 CPU GEMMs run on oneDNN.

PyTorch sends fp32 CPU matmuls to MKL, whose sgemm takes a generic path on AMD CPUs; oneDNN (shipped
inside PyTorch) ran the forward GEMMs of our transformers 25–30% faster and the input-gradient
GEMMs 15–25% faster on such a CPU (AMD EPYC, AVX-512).  :class:`Linear` is an ``nn.Linear`` (same
parameters, same state-dict keys) computed by :func:`linear`, which uses oneDNN for fp32 on CPU and
``F.linear`` everywhere else (CUDA, other dtypes, autocast, a PyTorch without the op).  The op is a
registered custom op, so ``torch.compile`` keeps it whole and fuses the elementwise work around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's GEMM: on CPUs where MKL's sgemm takes a generic path (AMD)
    it runs these shapes faster."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # ..., out


@torch.library.custom_op("latentforge_core::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`_onednn_gemm` as a custom op, so ``torch.compile`` keeps it whole and fuses around it,
    with an autograd formula."""
    return _onednn_gemm(x, weight, bias)


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula([torch.ops.latentforge_core.onednn_linear, torch.ops.mkldnn._linear_pointwise])
def _onednn_linear_flops(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    bias_shape: Sequence[int] | None = None,
    *_: Any,  # the kernel's fused-activation arguments
    out_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> int:
    """For ``FlopCounterMode``: 2 FLOPs per multiply-add, as it counts ``F.linear`` (both the custom
    op and the kernel it wraps, which :func:`linear` calls directly without autograd)."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


def _onednn_linear_setup(
    ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], output: torch.Tensor
) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(
    ctx: Any, grad: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Input gradient on oneDNN as well; the weight gradient on BLAS (as fast there)."""
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _onednn_linear(grad, weight.t(), None)  # ..., in
    flat = grad.reshape(-1, grad.shape[-1])  # B·N, out
    if ctx.needs_input_grad[1]:
        grad_w = flat.t() @ x.reshape(-1, x.shape[-1])  # out, in
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = flat.sum(0)  # out
    return grad_x, grad_w, grad_b


_onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


# Below this many multiply-adds a oneDNN call costs more than it saves: it pays ~20 µs of primitive
# set-up and dispatch where MKL runs the product in 5–20 µs (one decoding step's rows at D 256: the
# 16×256×256 attention output ran 17 µs on BLAS vs 27 µs on oneDNN; 1×256×256, 4 vs 20 µs).
SMALL_GEMM_MACS = 1 << 20


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 on CPU; ``F.linear`` elsewhere, under autocast, and for
    products too small to repay oneDNN's fixed cost (token decoding)."""
    cpu_fp32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    if (
        _ONEDNN
        and cpu_fp32
        and not torch.is_autocast_enabled("cpu")
        and x.numel() * weight.shape[0] > SMALL_GEMM_MACS
    ):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _onednn_linear(x, weight, bias)
        # Nothing for autograd to record: the kernel itself, without the custom op's Python layer
        # (~7 µs a call, 4% of a small model's decoding step).
        return _onednn_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

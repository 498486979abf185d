"""ODE and SDE samplers for the linear flow, in the internal time (t = 1 noise → t = 0 data).

Each sampler takes a velocity function ``fn(x, t) -> v`` (``t`` a Python float, the same for the
whole batch, so guidance can switch on and off per step) and the starting noise, and returns a
``SampleResult`` holding the final state and the number of function evaluations (NFE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import attrs
import torch

from latentforge_generators.transport import data_from_velocity, score_from_velocity, time_shift

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, float], Tensor]


@attrs.frozen
class SampleResult:
    x: Tensor
    nfe: int


def time_grid(steps: int, shift: float = 1.0, t_end: float = 0.0) -> list[float]:
    """``steps + 1`` times from 1 to ``t_end``, evenly spaced and then shifted toward noise."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must lie in [0, 1), got {t_end}")
    grid = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)
    return time_shift(grid, shift).tolist()


# ------------------------------------------------------------------------------------------------
#                                     Fixed-grid ODE solvers
# ------------------------------------------------------------------------------------------------


def euler(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """First order: one evaluation per step."""
    for t, t_next in pairwise(grid):
        x = x + (t_next - t) * fn(x, t)
    return SampleResult(x, len(grid) - 1)


def heun(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """Second order (explicit trapezoid): two evaluations per step."""
    for t, t_next in pairwise(grid):
        h = t_next - t
        v = fn(x, t)
        x_pred = x + h * v
        x = x + 0.5 * h * (v + fn(x_pred, t_next))
    return SampleResult(x, 2 * (len(grid) - 1))


# ------------------------------------------------------------------------------------------------
#                                 Adaptive Dormand–Prince 5(4)
# ------------------------------------------------------------------------------------------------

# Butcher tableau of Dormand & Prince (1980): nodes, stage weights, 5th-order weights (which are the
# last stage row, "first same as last"), and the difference between the 5th- and 4th-order weights.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip((*_DP_A[6], 0.0), _DP_B4, strict=True))


def _rms(x: Tensor) -> float:
    return x.float().square().mean().sqrt().item()


def dopri5(
    fn: VelocityFn,
    x: Tensor,
    t_start: float = 1.0,
    t_end: float = 0.0,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_steps: int = 10_000,
) -> SampleResult:
    """Adaptive 5th-order Runge–Kutta with an embedded 4th-order error estimate.

    Error is the RMS over the whole batch of ``err / (atol + rtol·max(|x|, |x_new|))`` (as in
    torchdiffeq, which SiT and LightningDiT call); a step is accepted when it is ≤ 1.
    """
    if atol <= 0 or rtol < 0:
        raise ValueError(f"dopri5 needs atol > 0 and rtol ≥ 0, got atol={atol}, rtol={rtol}")
    direction = math.copysign(1.0, t_end - t_start)
    t, k1, nfe = t_start, fn(x, t_start), 1
    h = direction * _initial_step(fn, x, t, k1, atol, rtol, abs(t_end - t_start), direction)
    nfe += 1
    for _ in range(max_steps):
        if (t_end - t) * direction <= 1e-12:
            return SampleResult(x, nfe)
        h = direction * min(abs(h), abs(t_end - t))
        ks = [k1]
        for c, a in zip(_DP_C[1:], _DP_A[1:], strict=True):
            x_stage = x + h * sum(w * k for w, k in zip(a, ks, strict=True) if w != 0.0)
            ks.append(fn(x_stage, t + c * h))
        nfe += 6
        x_new = x_stage  # the last stage is evaluated at the 5th-order solution (FSAL)
        err = h * sum(e * k for e, k in zip(_DP_E, ks, strict=True) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        ratio = _rms(err / scale)
        if ratio <= 1.0:
            t, x, k1 = t + h, x_new, ks[-1]
        factor = 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio**-0.2))
        h = h * factor
    raise RuntimeError(f"dopri5 did not reach t={t_end} within {max_steps} steps (stopped at t={t:.4g})")


def _initial_step(
    fn: VelocityFn, x: Tensor, t: float, f0: Tensor, atol: float, rtol: float, span: float, direction: float
) -> float:
    """Hairer, Nørsett & Wanner's starting step (Solving ODEs I, II.4): one extra evaluation."""
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = fn(x + direction * h0 * f0, t + direction * h0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    return min(100 * h0, h1, span)


# ------------------------------------------------------------------------------------------------
#                                    Euler–Maruyama SDE
# ------------------------------------------------------------------------------------------------

DIFFUSIONS = ("sigma", "constant")
LAST_STEPS = ("mean", "denoise", "euler", "none")


def euler_maruyama(
    fn: VelocityFn,
    x: Tensor,
    steps: int = 250,
    shift: float = 1.0,
    diffusion: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str = "mean",
    last_step_size: float = 0.04,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """The reverse SDE ``dx = [v - w(t)·score] dt + sqrt(2 w(t)) dW̄`` from t = 1 to ``last_step_size``.

    It has the same marginals as the ODE for any ``w`` (SiT). ``diffusion``: "sigma" ``w = norm·t``
    (SiT's default), "constant" ``w = norm``. The last interval down to t = 0 is deterministic:
    "mean" (the SDE drift, no noise, SiT's default), "denoise" (``x̂ = x - t v``), "euler" (ODE step),
    "none" (stop at ``last_step_size``). ``steps`` counts evaluations including the last step.
    """
    if diffusion not in DIFFUSIONS:
        raise ValueError(f"unknown SDE diffusion {diffusion!r}; expected one of {DIFFUSIONS}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown SDE last step {last_step!r}; expected one of {LAST_STEPS}")
    if not 0.0 < last_step_size < 1.0:
        raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"the SDE sampler needs steps ≥ 2, got {steps!r}")

    def drift(x: Tensor, t: float) -> tuple[Tensor, Tensor, float]:
        v = fn(x, t)
        w = diffusion_norm * (t if diffusion == "sigma" else 1.0)
        return v - w * score_from_velocity(x, v, t), v, w

    grid = time_grid(steps - 1, shift, t_end=last_step_size)
    nfe = 0
    for t, t_next in pairwise(grid):
        h = t - t_next
        d, _, w = drift(x, t)
        where = x.device if generator is None else generator.device
        noise = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
        x = x - h * d + math.sqrt(2 * w * h) * noise
        nfe += 1
    t = grid[-1]
    if last_step == "none":
        return SampleResult(x, nfe)
    d, v, _ = drift(x, t)
    if last_step == "mean":
        x = x - t * d
    elif last_step == "euler":
        x = x - t * v
    else:
        x = data_from_velocity(x, v, t)
    return SampleResult(x, nfe + 1)


# ------------------------------------------------------------------------------------------------
#                                         Dispatch
# ------------------------------------------------------------------------------------------------

SAMPLERS = ("euler", "heun", "dopri5", "sde")


def solve(
    name: str,
    fn: VelocityFn,
    noise: Tensor,
    steps: int = 50,
    shift: float = 1.0,
    t_end: float = 0.0,
    generator: torch.Generator | None = None,
    **options,
) -> SampleResult:
    """Run sampler ``name`` from ``noise`` (at t = 1); ``options`` go to that sampler."""
    if name in ("euler", "heun"):
        if options:
            raise TypeError(f"sampler {name!r} takes no options {sorted(options)}")
        return (euler if name == "euler" else heun)(fn, noise, time_grid(steps, shift, t_end))
    if name == "dopri5":  # adaptive: ``steps`` and ``shift`` only fix the end point
        return dopri5(fn, noise, 1.0, float(time_shift(torch.tensor(t_end), shift)), **options)
    if name == "sde":
        return euler_maruyama(fn, noise, steps, shift, generator=generator, **options)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")

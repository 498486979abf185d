"""ODE and SDE samplers for the linear flow, in the internal time (t = 1 noise → t = 0 data).

Each sampler takes a velocity function ``fn(x, t) -> v`` (``t`` a Python float, the same for the
whole batch, so guidance can switch on and off per step) and the starting noise, and returns a
``SampleResult`` holding the final state and the number of function evaluations (NFE).
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

import attrs
import torch

from latentforge_core import registry
from latentforge_core.errors import (
    InputError,
    InputTypeError,
    StateError,
    check_bool,
    check_choice,
    check_int,
    check_number,
)
from latentforge_generators.transport import data_from_velocity, score_from_velocity, time_shift

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, float], Tensor]


@attrs.frozen
class SampleResult:
    x: Tensor
    nfe: int


GRIDS = ("uniform", "logsnr", "edm")
# Few-step spacings in the log-SNR of the linear path, λ = log((1 - t)/t): "logsnr" is uniform in λ over
# [-LOGSNR_LIMIT, LOGSNR_LIMIT]; "edm" is Karras et al.'s ρ = 7 spacing of σ = t/(1 - t) = e^{-λ} over
# [EDM_SIGMAS[0], EDM_SIGMAS[1]]. Both keep the exact end points 1 and ``t_end``.
LOGSNR_LIMIT = 5.0
EDM_SIGMAS, EDM_RHO = (0.002, 80.0), 7.0


def time_grid(steps: int, shift: float = 1.0, t_end: float = 0.0, spacing: str = "uniform") -> list[float]:
    """``steps + 1`` times from 1 to ``t_end`` spaced by ``spacing`` (one of GRIDS), then shifted
    toward noise.

    "uniform" is even in t. The other two crowd the steps at both ends, where the velocity of a
    flow model bends most (at t → 0 the data-prediction changes fastest in t, at t → 1 the
    straight-line noise guess is corrected first); at NFE ≤ 8 that spends the few steps better.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= t_end < 1.0:
        raise InputError(f"t_end must lie in [0, 1), got {t_end}")
    if spacing not in GRIDS:
        raise InputError(f"unknown time grid {spacing!r}; expected one of {GRIDS}")
    if spacing == "uniform":
        return time_shift(torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64), shift).tolist()
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)  # [steps + 1]
    if spacing == "logsnr":
        high = LOGSNR_LIMIT if t_end == 0.0 else min(LOGSNR_LIMIT, _log_snr(t_end))
        grid = torch.sigmoid(LOGSNR_LIMIT - u * (LOGSNR_LIMIT + high))  # t = 1/(1 + e^{λ})
    else:
        low = EDM_SIGMAS[0] if t_end == 0.0 else max(EDM_SIGMAS[0], t_end / (1.0 - t_end))
        top, bottom = EDM_SIGMAS[1] ** (1 / EDM_RHO), low ** (1 / EDM_RHO)
        sigma = (top + u * (bottom - top)) ** EDM_RHO
        grid = sigma / (1.0 + sigma)
    grid[0], grid[-1] = 1.0, t_end  # the clipped λ-range's ends give way to the exact ones
    return time_shift(grid, shift).tolist()


# ------------------------------------------------------------------------------------------------
#                                     Fixed-grid ODE solvers
# ------------------------------------------------------------------------------------------------


def euler(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """First order: one evaluation per step, updating one buffer in place."""
    x = x.clone()  # the caller's noise stays as it was
    for t, t_next in pairwise(grid):
        x.add_(fn(x, t), alpha=t_next - t)  # one kernel, no temporary for h·v
    return SampleResult(x, len(grid) - 1)


def heun(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """Second order (explicit trapezoid): two evaluations per step."""
    for t, t_next in pairwise(grid):
        h = t_next - t
        v = fn(x, t)
        x_pred = torch.add(x, v, alpha=h)
        x = torch.add(x, v + fn(x_pred, t_next), alpha=0.5 * h)
    return SampleResult(x, 2 * (len(grid) - 1))


def midpoint(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """Second order (explicit midpoint): two evaluations per step, the second at the half step."""
    for t, t_next in pairwise(grid):
        h = t_next - t
        x = x + h * fn(x + 0.5 * h * fn(x, t), t + 0.5 * h)
    return SampleResult(x, 2 * (len(grid) - 1))


# ------------------------------------------------------------------------------------------------
#                                DPM-Solver++ multistep (data prediction)
# ------------------------------------------------------------------------------------------------


def _log_snr(t: float) -> float:
    """Half the log-SNR of the linear path, ``λ = log(α/σ)`` with ``α = 1 - t``, ``σ = t``."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log((1.0 - t) / t)


def dpm_solver_2m(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the flow ODE: one evaluation per step.

    It integrates exactly the linear part of the ODE written for the data prediction
    ``x̂0 = x_t - t v`` in ``λ = log((1 - t)/t)``, and extrapolates ``x̂0`` linearly in λ from the
    last two steps::

        x_next = (σ_next/σ)·x + α_next·(1 - e^{-h})·D,   h = λ_next - λ,
        D = (1 + 1/(2r))·x̂0 - 1/(2r)·x̂0_prev,          r = h_prev / h.

    A step without a finite previous ``h`` uses ``D = x̂0`` (first order, DDIM in data-prediction
    form, which on the linear path is the Euler step): the first step, and also the second, since the
    first starts at t = 1 where α = 0 and λ = -∞. A step that ends at t = 0 (σ = 0, λ = +∞) is
    first order too, and there the update is the plain denoised estimate ``x = x̂0``; with
    ``t_end > 0`` the last step is second order like the others. These few first-order steps (local
    error O(h²) each) keep the global order 2, but to t = 0 up to 3 steps are exactly Euler: the
    correction acts from the 3rd of ≥ 4 steps. On an evenly spaced grid to t = 0 the λ-steps next
    to t = 0 stay O(1), which costs a log factor: on a Gaussian toy the error falls 3.2–3.5× per
    doubling of 128–1024 steps (≈ 4.4× when stopping at t = 0.001).
    """
    x0_prev, h_prev = None, math.inf
    for t, t_next in pairwise(grid):
        x0 = x - t * fn(x, t)  # data_from_velocity, with t a Python float (no host-to-device copy)
        if t_next <= 0.0:
            x, h = x0, math.inf
        else:
            h = _log_snr(t_next) - _log_snr(t)
            d = x0
            if x0_prev is not None and math.isfinite(h_prev):
                half_inv_r = 0.5 * h / h_prev
                d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
            # -expm1(-h) = 1 - e^{-h}: exactly 1 from t = 1 (h = ∞), where x = ε̂ and the step is DDIM's
            # x_next = t_next·ε̂ + (1 - t_next)·x̂0
            x = (t_next / t) * x + (1.0 - t_next) * -math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return SampleResult(x, len(grid) - 1)


# ------------------------------------------------------------------------------------------------
#                           UniPC (bh2) multistep predictor–corrector
# ------------------------------------------------------------------------------------------------


def _unipc_step(
    x: Tensor,
    s: float,
    t: float,
    x0: Tensor,
    previous: tuple[Tensor, float] | None,
    x0_at_t: Tensor | None = None,
) -> Tensor:
    """One UniPC-bh2 update from ``x`` at ``s`` to ``t`` with the data prediction ``x0`` at ``s``:
    the predictor UniP, or with ``x0_at_t`` (the prediction at the predicted point) the corrector UniC.

    ``previous`` is the data prediction and λ of the step before ``s`` (None, or an infinite λ from
    t = 1, makes it first order). In ``h = λ_t - λ_s``, ``B(h) = e^{-h} - 1`` and ``D1 = (x̂0_prev -
    x̂0)/r`` with ``r = (λ_prev - λ_s)/h``::

        x_t = (σ_t/σ_s)·x + α_t(1 - e^{-h})·x̂0 - α_t·B(h)·Σ ρ_k·D_k

    where the predictor has ``Σ = D1/2`` (its order-2 form is DPM-Solver++(2M)), and the corrector
    adds ``D_t = x̂0_t - x̂0`` with weights solving Zhao et al.'s order conditions (``ρ = 1/2`` alone
    without a history).
    """
    lam_s = _log_snr(s)
    h = _log_snr(t) - lam_s
    b_h = math.expm1(-h)  # [-1, 0)
    history = previous is not None and math.isfinite(previous[1]) and math.isfinite(lam_s)
    terms = 0.0
    if history:
        r = (previous[1] - lam_s) / h
        d1 = (previous[0] - x0) / r
    if x0_at_t is None and history:
        terms = 0.5 * d1
    elif x0_at_t is not None and not history:
        terms = 0.5 * (x0_at_t - x0)
    elif x0_at_t is not None:
        # R·ρ = b with R = [[1, 1], [r, 1]], b_k = k!·φ_{k+1}(-h)/B(h) (φ_1 = (e^{-h} - 1)/(-h) - 1, …)
        phi_1 = b_h / -h - 1.0
        phi_2 = phi_1 / -h - 0.5
        b_1, b_2 = phi_1 / b_h, 2.0 * phi_2 / b_h
        rho_1 = (b_1 - b_2) / (1.0 - r)
        terms = rho_1 * d1 + (b_1 - rho_1) * (x0_at_t - x0)
    return (t / s) * x - (1.0 - t) * b_h * (x0 + terms)


def unipc(fn: VelocityFn, x: Tensor, grid: list[float]) -> SampleResult:
    """UniPC with the B(h) = e^{-h} - 1 variant ("bh2"; Zhao et al. 2023) in data-prediction form, order 2
    on the flow ODE: one evaluation per step.

    Each evaluation at the predicted point first corrects that point (UniC, using the evaluation at
    hand, so the corrector costs nothing) and then predicts the next one (UniP) from the corrected
    point, keeping the evaluation at the uncorrected point as the history, as diffusers'
    ``UniPCMultistepScheduler`` does. The step from t = 1 (λ = -∞) is first order, and so is the
    last one (diffusers' ``lower_order_final``), which has no corrector either (nothing is evaluated
    after it): to t = 0 it is the denoised estimate, and to ``t_end > 0`` it spans a long λ-interval
    where extrapolating the history costs more than it gains (Gaussian toy, 8 steps to t = 0.001:
    error 0.09 against 0.67 with a second-order last step).
    """
    start = None  # (x, t, x̂0) where the last step started
    previous = None  # (x̂0, λ) of the step before that
    last = len(grid) - 2
    for step, (t, t_next) in enumerate(pairwise(grid)):
        x0 = x - t * fn(x, t)  # data_from_velocity, with t a Python float (no host-to-device copy)
        if start is not None:
            x_s, s, x0_s = start
            x = _unipc_step(x_s, s, t, x0_s, previous, x0_at_t=x0)
            previous = (x0_s, _log_snr(s))
        start = (x, t, x0)
        x = _unipc_step(x, t, t_next, x0, None if step == last else previous)
    return SampleResult(x, len(grid) - 1)


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
        raise InputError(f"dopri5 needs atol > 0 and rtol ≥ 0, got atol={atol}, rtol={rtol}")
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
    raise StateError(f"dopri5 did not reach t={t_end} within {max_steps} steps (stopped at t={t:.4g})")


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
        raise InputError(f"unknown SDE diffusion {diffusion!r}; expected one of {DIFFUSIONS}")
    if last_step not in LAST_STEPS:
        raise InputError(f"unknown SDE last step {last_step!r}; expected one of {LAST_STEPS}")
    if not 0.0 < last_step_size < 1.0:
        raise InputError(f"last_step_size must lie in (0, 1), got {last_step_size}")
    if not isinstance(steps, int) or steps < 2:
        raise InputError(f"the SDE sampler needs steps ≥ 2, got {steps!r}")

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

SAMPLERS = ("euler", "heun", "midpoint", "dpm++2m", "unipc", "dopri5", "sde")
# The fixed-grid ODE solvers: ``steps`` intervals of ``time_grid(steps, shift, t_end, grid)``.
_GRID_SOLVERS: dict[str, Callable[[VelocityFn, Tensor, list[float]], SampleResult]] = {
    "euler": euler,
    "heun": heun,
    "midpoint": midpoint,
    "dpm++2m": dpm_solver_2m,
    "unipc": unipc,
}


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
    """Run sampler ``name`` from ``noise`` (at t = 1); ``options`` go to that sampler.

    NFE: ``steps`` for "euler", "dpm++2m" and "unipc", ``2·steps`` for "heun" and "midpoint";
    "dopri5" adapts; "sde" uses ``steps`` (last step included). The fixed-grid solvers take one
    option, ``grid``: the spacing of their time grid (GRIDS; default "uniform").
    """
    if name in _GRID_SOLVERS:
        spacing = options.pop("grid", "uniform")
        if options:
            raise InputTypeError(f"sampler {name!r} takes no options {sorted(options)}")
        return _GRID_SOLVERS[name](fn, noise, time_grid(steps, shift, t_end, spacing))
    if name == "dopri5":  # adaptive: ``steps`` and ``shift`` only fix the end point
        return dopri5(fn, noise, 1.0, float(time_shift(torch.tensor(t_end), shift)), **options)
    if name == "sde":
        return euler_maruyama(fn, noise, steps, shift, generator=generator, **options)
    raise InputError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


# ------------------------------------------------------------------------------------------------
#                     Checking ``generator.sample`` keywords without a model
# ------------------------------------------------------------------------------------------------

# The options each flow solver takes beyond ``steps``, ``shift`` and ``t_end`` (``solve``'s own).
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "euler": ("grid",),
    "heun": ("grid",),
    "midpoint": ("grid",),
    "dpm++2m": ("grid",),
    "unipc": ("grid",),
    "dopri5": ("atol", "rtol", "max_steps"),
    "sde": ("diffusion", "diffusion_norm", "last_step", "last_step_size"),
}
# Arguments the caller (a recipe) supplies at sampling time; a config naming them is a mistake.
RUNTIME_ONLY = ("y", "n", "noise", "generator", "guidance_model", "return_nfe")
GUIDANCE_NAMES = (None, "cfg", "autoguidance")


def _optional(check: Callable[..., Any]) -> Callable[..., Any]:
    return lambda value, name, owner: None if value is None else check(value, name, owner)


def _interval(value: Any, name: str, owner: str | None) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputTypeError(
            f"{owner + ': ' if owner else ''}{name} must be a pair [t_min, t_max], got {value!r}"
        )
    lo = check_number(value[0], f"{name}[0]", low=0, high=1, owner=owner)
    hi = check_number(value[1], f"{name}[1]", low=0, high=1, owner=owner)
    if lo > hi:
        raise InputError(f"{owner + ': ' if owner else ''}{name} must have t_min ≤ t_max, got {list(value)}")


def _guidance_name(value: Any, name: str, owner: str | None) -> None:
    if not hasattr(value, "needs_null_class"):  # a guidance object (CFG, AutoGuidance) passes
        check_choice(value, name, GUIDANCE_NAMES, owner=owner)


# One check per known option name, shared by every generator's ``sample`` (flow and token models).
OPTION_CHECKS: dict[str, Callable[[Any, str, str | None], Any]] = {
    "sampler": lambda v, k, o: check_choice(v, k, SAMPLERS, owner=o),
    "steps": lambda v, k, o: check_int(v, k, owner=o),
    "cfg_scale": lambda v, k, o: check_number(v, k, low=0, owner=o),
    "cfg_interval": _interval,
    "cfg_channels": _optional(lambda v, k, o: check_int(v, k, owner=o)),
    "guidance": _guidance_name,
    "shift": _optional(lambda v, k, o: check_number(v, k, low=0, low_open=True, owner=o)),
    "grid": lambda v, k, o: check_choice(v, k, GRIDS, owner=o),
    "t_end": _optional(lambda v, k, o: check_number(v, k, low=0, high=1, high_open=True, owner=o)),
    "amp": lambda v, k, o: check_bool(v, k, owner=o),
    "use_cache": lambda v, k, o: check_bool(v, k, owner=o),
    "atol": lambda v, k, o: check_number(v, k, low=0, low_open=True, owner=o),
    "rtol": lambda v, k, o: check_number(v, k, low=0, owner=o),
    "max_steps": lambda v, k, o: check_int(v, k, owner=o),
    "diffusion": lambda v, k, o: check_choice(v, k, DIFFUSIONS, owner=o),
    "diffusion_norm": lambda v, k, o: check_number(v, k, low=0, owner=o),
    "last_step": lambda v, k, o: check_choice(v, k, LAST_STEPS, owner=o),
    "last_step_size": lambda v, k, o: check_number(
        v, k, low=0, high=1, low_open=True, high_open=True, owner=o
    ),
    "temperature": lambda v, k, o: check_number(v, k, low=0, low_open=True, owner=o),
    "top_k": _optional(lambda v, k, o: check_int(v, k, owner=o)),
    "top_p": _optional(lambda v, k, o: check_number(v, k, low=0, high=1, low_open=True, owner=o)),
    "choice_temperature": lambda v, k, o: check_number(v, k, low=0, owner=o),
}


def sample_signature(target: Any) -> inspect.Signature | None:
    """The signature of ``sample`` for ``target``: a registry name, a builder (its return annotation
    names the class), a class or an instance; None when it cannot be known without building."""
    if isinstance(target, str):
        target = registry.generators.get(target)
    cls = target if inspect.isclass(target) else None
    if cls is None and inspect.isfunction(target):
        try:
            cls = typing.get_type_hints(target).get("return")
        except Exception:  # an annotation that does not resolve: nothing to check against
            cls = None
    if cls is None and hasattr(type(target), "sample") and not inspect.isroutine(target):
        cls = type(target)
    method = getattr(cls, "sample", None) if inspect.isclass(cls) else None
    if method is None:
        return None
    try:
        return inspect.signature(method)
    except (TypeError, ValueError):
        return None


def check_sample_options(
    target: Any,
    options: Mapping[str, Any],
    *,
    where: str = "sampler",
    owner: str | None = None,
    from_config: bool = True,
) -> None:
    """Check keyword arguments of ``generator.sample`` without building a model.

    ``target`` is a generator's registry name, builder, class or instance (None: check the values of
    known options only).  An option ``sample`` does not take (for a flow generator: one its
    ``sampler`` does not take), a value out of range (``steps: 0``, a negative ``cfg_scale``,
    ``cfg_interval`` outside [0, 1], …) or, with ``from_config``, an argument only the caller can
    give (``y``, ``noise``, …) raises an InputError/InputTypeError naming ``where.<option>``.
    """
    if not isinstance(options, Mapping):
        raise InputTypeError(f"{where} must be a mapping of sample() keyword arguments, got {options!r}")
    sig = sample_signature(target) if target is not None else None
    key = (lambda k: f"{where}.{k}") if owner is None else (lambda k: k)
    for name in options:
        if from_config and name in RUNTIME_ONLY:
            raise InputError(
                f"{key(name)}: {name!r} is given by the recipe at sampling time, not by a config"
            )
    sampler = options.get("sampler")
    if sig is not None:
        params = {p: v for p, v in sig.parameters.items() if p not in ("self", "y")}
        takes_more = any(v.kind is v.VAR_KEYWORD for v in params.values())
        named = [p for p, v in params.items() if v.kind is not v.VAR_KEYWORD]
        if sampler is None and "sampler" in params:
            sampler = params["sampler"].default
        extra = SOLVER_OPTIONS.get(sampler, ()) if takes_more and "sampler" in params else ()
        for name in options:
            if name in named or name in extra or (takes_more and "sampler" not in params):
                continue
            accepted = [p for p in [*named, *extra] if p not in RUNTIME_ONLY]
            close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            which = f" with sampler {sampler!r}" if extra or sampler in SOLVER_OPTIONS else ""
            owners = [s for s, names in SOLVER_OPTIONS.items() if name in names]
            if owners and "sampler" in params:
                hint += f" ({name!r} is an option of sampler {' or '.join(map(repr, owners))})"
            raise InputTypeError(
                f"{(owner + ': ') if owner else ''}unknown option {key(name)!r}{which}.{hint} "
                f"It accepts: {', '.join(accepted)}"
            )
    for name, value in options.items():
        if name in OPTION_CHECKS:
            OPTION_CHECKS[name](value, key(name), owner)
    if sampler == "sde" and "steps" in options and options["steps"] < 2:
        raise InputError(
            f"{(owner + ': ') if owner else ''}{key('steps')} must be ≥ 2 for the SDE sampler, "
            f"got {options['steps']!r}"
        )

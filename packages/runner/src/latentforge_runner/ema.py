"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): choose the EMA length after training instead of before it.

A power-function EMA of exponent γ weighs, at step ``t``, the parameters of step ``τ ≤ t`` in
proportion to ``τ^γ``: it forgets a fixed *fraction* of the run, not a fixed number of steps.  Its
width is named by ``σ_rel``, the standard deviation of those weights relative to ``t`` (EDM2 tracks
σ_rel 0.05 and 0.10).  Training tracks two such profiles and saves both every few steps
(``<run>/ema_snapshots/<step>.safetensors``); any other σ_rel at any snapshot's step is then the
combination of the snapshots whose response (weights over the past steps) is closest in least squares
to the wanted one: :func:`reconstruct`.

Time here counts optimiser steps, so one step's update of a profile is a lerp towards the live
weights by ``1 - β_t`` with ``β_t = (1 - 1/t)^(γ+1)`` (:func:`power_beta`; ``β_1 = 0``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from latentforge_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from latentforge_core.errors import InputError
from latentforge_runner import distributed
from latentforge_runner.config import ConfigError, SettingError

SNAPSHOT_DIR = "ema_snapshots"  # beside checkpoints/ in a run folder; never rotated
POSTHOC_DIR = "posthoc"  # where the posthoc-ema recipe writes its reconstructions
# σ_rel of γ = 0 (a uniform average of the whole run): wider profiles need γ < 0, which EDM2 never uses.
SIGMA_REL_MAX = 1 / math.sqrt(12)


# ------------------------------------------------------------------------------------------------
# Power-function profiles: σ_rel ↔ γ, the per-step decay, inner products of responses
# ------------------------------------------------------------------------------------------------
def sigma_rel_of(gamma: float) -> float:
    """σ_rel of the exponent ``gamma`` (EDM2 eq. 123): the std of ``τ^γ`` on [0, 1], normalised."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent γ ≥ 0 whose profile has width ``sigma_rel``: the largest real root of
    ``(γ+2)²(γ+3) = σ_rel⁻² (γ+1)``, a cubic (EDM2 eq. 126)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise InputError(
            f"sigma_rel {sigma_rel!r} is out of range: expected 0 < sigma_rel < {SIGMA_REL_MAX:.4f} "
            "(γ > 0; EDM2 uses 0.05 to 0.10)"
        )
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, step: int) -> float:
    """The decay of the update that ends step ``step`` (1 for the first): the profile at ``t`` is then
    ``∝ τ^γ`` over the steps τ ≤ t."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def response_inner(
    step_a: np.ndarray, gamma_a: np.ndarray, step_b: np.ndarray, gamma_b: np.ndarray
) -> np.ndarray:
    """⟨p_a, p_b⟩ of the normalised responses ``p(τ) = (γ+1) τ^γ / t^(γ+1)`` on [0, t] (broadcast):
    the integral of their product up to the earlier of the two steps."""
    step_a, gamma_a, step_b, gamma_b = (
        np.asarray(x, dtype=np.float64) for x in (step_a, gamma_a, step_b, gamma_b)
    )
    upto = np.minimum(step_a, step_b)
    g = gamma_a + gamma_b + 1
    return (
        (gamma_a + 1)
        * (gamma_b + 1)
        / g
        * (upto / step_a) ** (gamma_a + 1)
        * (upto / step_b) ** (gamma_b + 1)
        / upto
    )


def posthoc_coefficients(
    steps: Sequence[int], sigma_rels: Sequence[float], at_step: int, sigma_rel: float
) -> np.ndarray:
    """Weights ``x`` (one per snapshot ``(steps[i], sigma_rels[i])``, summing to 1) whose combination
    of the snapshots' responses is the least-squares fit of the profile ``sigma_rel`` at ``at_step``:
    the normal equations ``A x = b`` of the responses' inner products (EDM2 Algorithm 3), solved in
    least squares too, as ``A`` nears singular when snapshots are many."""
    steps_ = np.asarray(steps, dtype=np.float64)
    gammas = np.asarray([gamma_of(s) for s in sigma_rels])
    gram = response_inner(steps_[:, None], gammas[:, None], steps_[None, :], gammas[None, :])  # [S, S]
    target = response_inner(steps_, gammas, np.float64(at_step), np.float64(gamma_of(sigma_rel)))  # [S]
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    return x / x.sum()


# ------------------------------------------------------------------------------------------------
# Snapshots on disk
# ------------------------------------------------------------------------------------------------
def profile_name(sigma_rel: float) -> str:
    """The weight name of a tracked profile (``ema_sigma_0.05``), in checkpoints and as a choice."""
    return f"ema_sigma_{float(sigma_rel)!r}"


def decay_name(decay: float) -> str:
    """The weight name of a tracked EMA rate (``ema_0.999``), in checkpoints and as a choice."""
    return f"ema_{float(decay)!r}"


def write_snapshot(
    folder: str | Path,
    step: int,
    profiles: Mapping[float, torch.nn.Module],
    config: Mapping[str, Any],
    main: bool = True,
) -> Path | None:
    """``<folder>/<step>.safetensors``: every profile's weights as ``<σ_rel>/<name>`` (atomic), written
    by the ``main`` process.  Under FSDP the profiles are sharded: every process calls it, their
    shards are gathered to the main process (the others return None)."""
    states = {sigma: distributed.full_state_dict(module) for sigma, module in profiles.items()}
    if not main:
        return None
    tensors = {
        f"{float(sigma)!r}/{key}": value for sigma, state in states.items() for key, value in state.items()
    }
    meta = {**config, "step": step, "sigma_rel": [float(s) for s in profiles]}
    return save_checkpoint(tensors, Path(folder) / f"{step:08d}.safetensors", meta)


def list_snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, file)`` of the snapshots in ``folder``, oldest first (none: an empty list)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = (p for p in folder.iterdir() if re.fullmatch(r"\d+\.safetensors", p.name))
    return sorted((int(p.stem), p) for p in found)


def reconstruct(
    snapshots: str | Path, sigma_rel: float, at_step: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The power-function EMA of width ``sigma_rel`` at ``at_step`` (default: the newest snapshot's
    step, which it must be one of) from the snapshot folder ``snapshots``: ``(state_dict, config)``,
    config as the snapshots carry it with this ``step`` and ``sigma_rel``.

    Exact only in the limit of dense snapshots: between two snapshots the fit cannot follow the
    target's response, so the result differs from a profile tracked directly by a small fraction of
    how far the weights moved (see the tests for a measured bound)."""
    gamma_of(sigma_rel)  # checks the range before anything is read
    found = list_snapshots(snapshots)
    if not found:
        raise InputError(
            f"{snapshots} holds no EMA snapshots (<step>.safetensors): train with training.ema_profiles "
            "and training.ema_snapshot_every set"
        )
    if at_step is None:
        at_step = found[-1][0]
    if at_step not in {step for step, _ in found}:
        raise InputError(
            f"at_step {at_step}: no snapshot at that step in {snapshots}; expected one of "
            f"{', '.join(str(step) for step, _ in found)}"
        )
    used = [(path, _snapshot_config(path)) for step, path in found if step <= at_step]
    rows = [(meta["step"], float(sigma)) for _, meta in used for sigma in meta["sigma_rel"]]
    x = posthoc_coefficients([s for s, _ in rows], [g for _, g in rows], at_step, sigma_rel)
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    weights = iter(x)
    for path, meta in used:  # one file in memory at a time
        tensors = load_checkpoint(path)[0]
        for sigma in meta["sigma_rel"]:
            weight = next(weights)
            prefix = f"{float(sigma)!r}/"
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if dtypes and part.keys() != dtypes.keys():
                raise CheckpointError(f"{path}: profile {sigma} holds other weights than the others")
            for key, value in part.items():
                dtypes[key] = value.dtype
                if value.is_floating_point():  # accumulated in float64, cast back at the end
                    out[key] = out.get(key, 0) + weight * value.double()
                else:  # integer buffers (counters) are copies of the model's: the newest one's
                    out[key] = value
    state = {k: v.to(dtypes[k]) for k, v in out.items()}
    config = {**used[-1][1], "step": at_step, "sigma_rel": float(sigma_rel)}
    return state, config


def _snapshot_config(path: Path) -> dict[str, Any]:
    """A snapshot's metadata (its step and profiles), without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable EMA snapshot (truncated or corrupted?): {err}"
        ) from err
    if not {"step", "sigma_rel"} <= set(config):
        raise CheckpointError(f"{path}: no step and sigma_rel in its metadata; expected an EMA snapshot")
    return config


WEIGHT_NAME = re.compile(r"model|ema|ema_(sigma_)?\d*\.?\d+(e-?\d+)?")  # a checkpoint's weight files


def weights_name(inst: Any, attribute: Any, value: str | tuple[str, ...]) -> None:
    """An attrs validator: names of a run's weight files (each item of a tuple)."""
    for name in value if isinstance(value, tuple) else (value,):
        if not WEIGHT_NAME.fullmatch(name):
            raise SettingError(
                attribute.name,
                "expected model, ema, a tracked rate ema_<decay> (ema_0.999) or power-function EMA "
                f"ema_sigma_<sigma_rel> (ema_sigma_0.05), got {name!r}",
            )


def check_weights(folder: str | Path, weights: str, what: str = "weights") -> None:
    """A :class:`~latentforge_runner.config.ConfigError` naming the weight files ``folder`` holds unless
    one is ``<weights>.safetensors`` (``ema`` and ``model`` pass: a run without EMA samples its model)."""
    from latentforge_runner.training import checkpoint_weights  # training imports this module

    folder = Path(folder)
    held = checkpoint_weights(folder) if folder.is_dir() else []
    if weights in ("ema", "model") or weights in held:
        return
    raise ConfigError(
        f"{what}={weights}: {folder} holds no {weights} weights (an EMA the run did not track?); "
        f"expected one of {', '.join(held) or 'nothing: it holds no weights'}"
    )

"""Device, precision and seeding helpers.

On CUDA the default compute dtype is bf16 through autocast; on CPU it is fp32, because bf16
matmuls on CPUs without AVX-512-BF16 run about 200x slower than fp32 (measured on the dev machine).
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch

from latentforge_core.errors import InputError, InputTypeError, StateError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` pick CUDA when present; anything else is validated."""
    if device is None or device == "auto":
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise InputTypeError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(
            f"device {device!r} is not a device torch knows: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StateError(
            f"device {device} was requested but CUDA is not available on this machine "
            "(expected 'auto' or 'cpu' here)"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise StateError(
            f"device {device} was requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(
    device: torch.device, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A mixed-precision context for ``device``; a no-op when the dtype is fp32."""
    dtype = default_dtype(device) if dtype is None else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    if not 0 <= seed < 2**32:
        raise InputError(f"seed must be in [0, 2**32), got {seed}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every RNG state, so that a resumed run draws the same numbers as an uninterrupted one."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    if isinstance(np_state, dict):  # NumPy's global RandomState was given another bit generator
        raise StateError(
            f"rng_state saves NumPy's global MT19937 state, but it runs {np_state['bit_generator']}"
        )
    _, keys, pos, has_gauss, cached = np_state
    # Plain tensors, ints and floats only, so the state loads with torch.load(weights_only=True).
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

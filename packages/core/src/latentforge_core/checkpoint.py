"""Checkpoint I/O: our safetensors format, safe loading of foreign files, strict key checks.

Our format is a safetensors file whose metadata holds the component's config as JSON (under
``"config"``), so a file says what it is.  Every write goes to a temporary file in the same folder,
is fsync'ed and renamed over the target: a killed process leaves the old file or the new one, never
half of one.  Foreign ``.pt``/``.pth``/``.bin`` files are opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save_bytes

from latentforge_core.errors import InputTypeError, LatentforgeError, MissingFileError

FORMAT = "latentforge"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(LatentforgeError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the module it is loaded into."""


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through an atomic write (for training state: optimizer, RNG, step)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# Our safetensors format
# ------------------------------------------------------------------------------------------------
def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, config: Mapping[str, Any] | None = None
) -> Path:
    """Write ``state_dict`` (+ ``config`` as JSON metadata) to a safetensors file, atomically."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise InputTypeError(
                f"state_dict[{key!r}] must be a tensor to be saved in {path}, got {type(value).__name__}"
            )
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": FORMAT, "config": json.dumps(dict(config or {}), sort_keys=True)}
    data = st_save_bytes(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file; returns ``(state_dict, config)`` (config ``{}`` for foreign files)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open, not a dict)
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {err}"
        ) from err
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the 'config' metadata is not valid JSON: {err}") from err
    return state, config


# ------------------------------------------------------------------------------------------------
# Foreign files
# ------------------------------------------------------------------------------------------------
def load_torch_file(path: str | os.PathLike) -> Any:
    """Open a ``.pt/.pth`` file with ``weights_only=True``: tensors and plain containers only."""
    path = _existing(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"could not load {path} with torch.load(weights_only=True): {err}. The file is "
            "truncated or corrupted, or holds objects beyond tensors and plain containers; "
            "latentforge never unpickles arbitrary objects"
        ) from err


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors, torch or ``.npy`` file, chosen by suffix."""
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_checkpoint(path)[0]
    if suffix in TORCH_SUFFIXES:
        obj = load_torch_file(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict")
        return dict(obj)
    if suffix == ".npy":
        try:
            return {"": torch.from_numpy(np.load(path, allow_pickle=False))}
        except ValueError as err:
            raise CheckpointError(f"{path} is not a readable .npy array: {err}") from err
    raise CheckpointError(
        f"{path}: unknown checkpoint suffix {suffix!r}; expected .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)} or .npy"
    )


def _existing(path: str | os.PathLike) -> Path:
    """``path`` as a local file: a hub id (``hf:<org>/<repo>/<file>``) resolves through the hub cache."""
    if isinstance(path, str) and path.startswith("hf:"):
        from latentforge_core.hub import resolve  # the hub module builds on this one

        path = resolve(path)
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(
            f"checkpoint {path} is a folder, not a file: expected a weights file (in a checkpoint folder, "
            "its model.safetensors or ema.safetensors)"
        )
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return path


# ------------------------------------------------------------------------------------------------
# Loading into a module
# ------------------------------------------------------------------------------------------------
def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    what: str = "model",
) -> None:
    """Raise a ``CheckpointError`` listing missing/unexpected keys and every shape mismatch."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    shared = [k for k in expected if k in given and tuple(given[k].shape) == tuple(expected[k].shape)]
    kinds = [
        f"{k}: checkpoint {given[k].dtype} vs model {expected[k].dtype}"
        for k in shared
        if given[k].is_floating_point() != expected[k].is_floating_point()
    ]
    non_finite = [k for k in shared if _newly_non_finite(given[k], expected[k])]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + _listing(mismatched))
    if kinds:
        problems.append(
            f"{len(kinds)} dtype mismatch(es) (expected floating weights as floats): " + _listing(kinds)
        )
    if non_finite:
        problems.append(
            f"{len(non_finite)} tensor(s) holding NaN or infinite values (expected finite weights; was the "
            "run diverging when this was saved?): " + _listing(non_finite)
        )
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): " + _listing(missing))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + _listing(unexpected))
    if problems:
        layout = mismatched or (strict and (missing or unexpected))
        head = (
            f"the checkpoint does not fit this {what} (is it a checkpoint of another model or size?)"
            if layout
            else f"the checkpoint's weights cannot be loaded into this {what}"
        )
        raise CheckpointError(f"{head}; " + "; ".join(problems))


def load_into(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """``module.load_state_dict`` with an error that names every offending key and shape."""
    check_state_dict(module.state_dict(), state_dict, strict=strict, what=type(module).__name__)
    module.load_state_dict(state_dict, strict=strict)


def _newly_non_finite(given: torch.Tensor, model: torch.Tensor) -> bool:
    """A floating tensor with NaN/inf where the model's own (a finite buffer or parameter) has none."""
    if not given.is_floating_point() or given.is_meta or bool(torch.isfinite(given).all()):
        return False
    return model.is_meta or not model.is_floating_point() or bool(torch.isfinite(model).all())


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")

"""Tests on a real GPU: every test here carries the ``cuda`` marker and is skipped, with the reason, where
CUDA is absent.  Run them with ``make test-gpu`` (``pytest -m cuda tests/gpu``: the explicit ``-m``
replaces the default ``-m 'not slow'`` of ``addopts``)."""

from __future__ import annotations

import os

import pytest
import torch


def cuda_skip_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can (``LATENTFORGE_GPU_DRY_RUN=1``: run
    them on the CPU anyway, to check the tests themselves)."""
    if os.environ.get("LATENTFORGE_GPU_DRY_RUN", "") == "1":
        return None
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"CUDA is not available (torch {torch.__version__}, {build}); these tests need a GPU"
    return None


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    reason = cuda_skip_reason()
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.cuda)  # every test of this folder, even one that forgot the marker
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))

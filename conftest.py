"""Shared by tests/ and benchmarks/."""

import importlib.util
from pathlib import Path

import torch

_TORCHVISION_STUBS = None


def _load_or_stub_torchvision_ops() -> None:
    """torchvision's compiled ops fail to load beside the local CPU torch build.

    The peers we compare against (pytorch-fid, lpips, torch-fidelity) only need torchvision's
    Python model code, but torchvision's import registers fake kernels for ``nms``/``qnms`` and
    fails if the ops do not exist. Define the two schemas (no kernel) when the real library
    cannot be loaded; detection ops stay unusable, which nothing here needs.
    """
    global _TORCHVISION_STUBS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return
        except (OSError, RuntimeError):
            break
    _TORCHVISION_STUBS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_STUBS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_load_or_stub_torchvision_ops()

"""Reports a recipe writes (``evaluation.json``, ``report.json``, …): valid JSON, written atomically.

Python's ``json`` writes ``Infinity`` and ``NaN``, which are not JSON; a metric can be infinite (PSNR
of a lossless round trip) or undefined, so non-finite numbers are written as the strings ``"inf"``,
``"-inf"`` and ``"nan"`` instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from latentforge_core.checkpoint import atomic_path

# ``sample`` writes the paper's figure it reproduces (its ``paper`` block) and how the samples were
# made beside ``samples.npz``; ``evaluate`` reads it there and reports ours beside the paper's.
PROTOCOL_FILE = "protocol.json"


def to_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def write_report(path: str | Path, report: Any) -> Path:
    """Write ``report`` as indented, strictly valid JSON; a killed process leaves the old file whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_json(report), indent=2, allow_nan=False))
    return Path(path)

"""The benchmark report's honesty checks (benchmarks/conftest.py): no timing is asserted here."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch


def _conftest():
    """A private copy of benchmarks/conftest.py, so its helpers are called without its session state."""
    spec = importlib.util.spec_from_file_location(
        "_bench_conftest_copy", Path(__file__).parent / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_impossible_mfu_is_flagged_invalid_and_load_is_recorded(tmp_path):
    bench = _conftest()
    # 3 TFLOP in one second against a 1000 GFLOP/s peak: 300% MFU, which no model can reach.
    impossible = bench._row("dit", "ours", "images/s", 10, 1.0, 3e12, 1000.0, 1.5)
    honest = bench._row("dit", "peer", "images/s", 5, 1.0, 5e11, 1000.0, 1.5)
    assert impossible["valid"] is False and impossible["mfu"] is None and "100%" in impossible["invalid"]
    assert honest["valid"] is True and honest["mfu"] == 0.5
    assert impossible["load"] == 1.5 and impossible["peak_gflops"] == 1000.0

    results = tmp_path / "results.md"
    # An earlier row of another group in today's layout is kept; one in the old layout is dropped.
    kept = "| other | ours | 1.00 images/s |  | 9.0 |  |  | 0.10 | 2026-01-01 |"
    results.write_text(
        f"{bench.HEADER}\n{bench.SEPARATOR}\n{kept}\n| old | ours | 1.00 images/s |  | 306% |  | x |\n"
    )
    lines = bench._write_results([impossible, honest], results)
    ours_line = next(line for line in lines if "| ours |" in line)
    cells = [cell.strip() for cell in ours_line.split("|")[1:-1]]
    header = [cell.strip() for cell in bench.HEADER.split("|")[1:-1]]
    assert cells[header.index("MFU")] == bench.INVALID
    assert "300%" not in ours_line  # the impossible figure is not printed
    assert cells[header.index("load")] == "1.50"
    assert cells[header.index("peak GFLOP/s")] == "1000.0"
    peer_line = next(line for line in lines if "| peer |" in line)
    assert "| 50% |" in peer_line
    text = results.read_text()
    assert ours_line in text and kept in text and "| old |" not in text


def test_peak_is_measured_beside_the_measurement_with_the_load():
    bench = _conftest()
    calls = []
    result, peak, load = bench._beside_peak(torch.device("cpu"), False, lambda: calls.append(1) or "out")
    assert result == "out" and calls == [1]
    assert peak > 0
    if hasattr(os, "getloadavg"):
        assert isinstance(load, float) and load >= 0

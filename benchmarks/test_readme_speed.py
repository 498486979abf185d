"""The README's speed table writer (benchmarks/readme_speed.py), on a made-up report: no timing here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _load(name: str):
    """A module of benchmarks/ by its path (the tests import in importlib mode, off sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


readme_speed = _load("readme_speed")


def _report(skip: str | None = None) -> dict:
    """A pytest-benchmark JSON with ours at twice each peer's throughput, in both row layouts."""
    row = _load("conftest")._row
    benchmarks = []
    for i, path in enumerate(readme_speed.HOT_PATHS):
        if path.group == skip:
            continue
        ours = row(path.group, "ours", "images/s", 20, 1.0, 1e11, 1000.0, 1.0 + i / 100)
        peer = row(path.group, f"{path.peer} (peer)", "images/s", 10, 1.0, None, 900.0, 0.5)
        # A variant of ours named after the peer (as "ours-faiss"), listed first: never the peer.
        decoy = row(path.group, f"ours-{path.peer}", "images/s", 1, 1.0, None, 900.0, 0.5)
        if i % 2:  # measure_interleaved: one row per implementation under its name
            info = {"ours": ours, decoy["impl"]: decoy, peer["impl"]: peer, "note": 1.0}
            benchmarks.append({"extra_info": info})
        else:  # measure: the row is the extra info itself, one benchmark per implementation
            benchmarks += [{"extra_info": ours}, {"extra_info": decoy}, {"extra_info": peer}]
    machine = {"torch": "2.13.0", "threads": 2, "cpu_count": 2, "processor": "x86_64", "cuda": None}
    return {"datetime": "2026-12-06T23:00:00", "machine_info": machine, "benchmarks": benchmarks}


def test_the_table_holds_every_hot_path_with_the_run_and_replaces_only_its_section(tmp_path):
    report, readme = tmp_path / "headline.json", tmp_path / "README.md"
    report.write_text(json.dumps(_report()))
    readme.write_text(f"# x\n\nbefore\n{readme_speed.BEGIN}\nold table\n{readme_speed.END}\nafter\n")
    readme_speed.main([str(report), str(readme)])
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "hot path" not in line]
    assert len(rows) == len(readme_speed.HOT_PATHS)
    goals = sum(path.goal is not None for path in readme_speed.HOT_PATHS)
    assert sum("2.00× ✓" in r for r in rows) == sum(
        p.goal is not None and p.goal <= 2 for p in readme_speed.HOT_PATHS
    )
    assert sum("2.00× ✗" in r for r in rows) == goals - sum(
        p.goal <= 2 for p in readme_speed.HOT_PATHS if p.goal
    )
    assert all("(10% MFU)" in r for r in rows)
    assert "on 2026-12-06 (UTC)" in text and "load 0.50–1.18" in text and "peak GEMM 900–1000" in text


def test_a_partial_run_is_refused_naming_the_missing_row_and_the_readme_is_kept(tmp_path):
    missing = readme_speed.HOT_PATHS[0].group
    report, readme = tmp_path / "headline.json", tmp_path / "README.md"
    report.write_text(json.dumps(_report(skip=missing)))
    original = f"{readme_speed.BEGIN}\nold table\n{readme_speed.END}\n"
    readme.write_text(original)
    with pytest.raises(SystemExit, match=missing):
        readme_speed.main([str(report), str(readme)])
    assert readme.read_text() == original
    with pytest.raises(SystemExit, match="make bench-headline"):
        readme_speed.main([str(tmp_path / "absent.json"), str(readme)])


def test_the_repository_readme_has_the_section():
    readme = (HERE.parent / "README.md").read_text()
    assert readme.count(readme_speed.BEGIN) == 1 and readme.count(readme_speed.END) == 1

"""Write the README's speed table from one ``make bench-headline`` run.

    python benchmarks/readme_speed.py benchmarks/headline.json README.md

Reads the rows that ``benchmarks/conftest.py`` stored in pytest-benchmark's JSON and replaces the
lines between the two markers of the README with one table: each hot path, ours, the peer, the ratio
of the two from the same run, the goal, and a header line with the run's date, the machine, its
load and the peak GEMM measured beside the rows.  A run that lacks a row is refused (naming what is
missing), so a partial run never leaves a table that mixes runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

BEGIN = "<!-- speed table: written by `make bench-headline` (benchmarks/readme_speed.py) -->"
END = "<!-- end of speed table -->"


@dataclass(frozen=True)
class HotPath:
    label: str  # the README's wording
    group: str  # the benchmark group (exact)
    peer: str  # the start of the peer row's impl name
    goal: float | None  # ours / peer to reach; None: reported, no goal


HOT_PATHS = (
    HotPath(
        "GPT sampling, 256 tokens × batch 16 (4 × 256 model)",
        "gpt sampling, 256 tokens x batch 16",
        "transformers",
        2.0,
    ),
    HotPath("K-Means fit, 100k × 768, K = 1024, 10 iterations", "kmeans-fit", "faiss", 1.0),
    HotPath("nearest-codeword assignment, same size", "kmeans-assign", "faiss", 1.1),
    HotPath("precision/recall, 10k × 2048", "metrics: precision/recall", "torch-fidelity", 1.5),
    HotPath("DiT-B/2 training step, batch 32", "train step dit-b-2 b32", "diffusers", 1.3),
    HotPath("DINOv2-B/14-reg, batch 32", "encoder-dinov2-vitb14-reg-b32", "transformers", 1.3),
    HotPath("MAE-B/16, batch 32", "encoder-mae-vitb16-b32", "transformers", 1.3),
    HotPath("SigLIP2-B/16, batch 32", "encoder-siglip2-vitb16-256-b32", "transformers", 1.3),
    HotPath("50-step Euler + CFG, DiT-S/2, 256 tokens", "sample euler-50 cfg", "diffusers", 1.2),
    HotPath("Heun + CFG, NFE 50, DiT-S/2", "sample heun-nfe50 cfg", "diffusers", 1.2),
    HotPath("dopri5 + CFG, DiT-S/2", "sample dopri5 cfg", "torchdiffeq", 1.2),
    HotPath(
        "Euler loop alone, 50 steps (1-multiply model)",
        "sampler loop alone (1-multiply model) euler",
        "diffusers",
        None,
    ),
    HotPath(
        "Heun loop alone, NFE 50 (1-multiply model)",
        "sampler loop alone (1-multiply model) heun",
        "diffusers",
        None,
    ),
    HotPath(
        "dopri5 loop alone (1-multiply model)",
        "sampler loop alone (1-multiply model) dopri5",
        "torchdiffeq",
        None,
    ),
    HotPath(
        "cached latents 32×16×16 beside what a training step consumes",
        "data cached latents 32×16×16 fp32, 2048 + flips, batches of 256",
        "train step",
        10.0,
    ),
    HotPath(
        "cached latents beside the safetensors shards they replace",
        "data cached latents 32×16×16 fp32, 2048 + flips, batches of 256",
        "safetensors shards",
        None,
    ),
    *(
        HotPath(
            f"JPEG folder → 256 px crop + flip, {workers} loader worker{'' if workers == 1 else 's'}",
            f"data JPEG folder → 256px crop+flip, {workers} workers",
            "torchvision",
            None,
        )
        for workers in (0, 1, 2)
    ),
)


def rows_of(report: dict) -> dict[tuple[str, str], dict]:
    """{(group, impl): row} from pytest-benchmark's JSON: ``measure`` stores one row as the extra
    info itself, ``measure_interleaved`` one row per implementation under its name."""
    rows = {}
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        found = [info] if "throughput" in info else [v for v in info.values() if isinstance(v, dict)]
        for row in found:
            if "throughput" in row:
                rows[row["group"], row["impl"]] = row
    return rows


def _figure(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def _ours_cell(row: dict) -> str:
    cell = _figure(row["throughput"], row["unit"])
    if not row.get("valid", True):
        return cell + " (**invalid**: MFU > 100%)"
    return cell + (f" ({100 * row['mfu']:.0f}% MFU)" if row.get("mfu") is not None else "")


def table(report: dict) -> list[str]:
    """The section's lines: the run's header line, then one table line per hot path."""
    rows = rows_of(report)
    missing, lines = [], []
    for path in HOT_PATHS:
        ours = rows.get((path.group, "ours"))
        peer = next(
            (r for (g, impl), r in rows.items() if g == path.group and impl.startswith(path.peer)), None
        )
        if ours is None or peer is None:
            missing.append(f"{path.group!r} ({'ours' if ours is None else path.peer + '…'})")
            continue
        ratio = ours["throughput"] / peer["throughput"]
        goal = "—" if path.goal is None else f"{path.goal:g}×"
        met = "" if path.goal is None else (" ✓" if ratio >= path.goal else " ✗")
        theirs = f"{peer['impl']}: {_figure(peer['throughput'], peer['unit'])}"
        lines.append(f"| {path.label} | {_ours_cell(ours)} | {theirs} | {ratio:.2f}×{met} | {goal} |")
    if missing:
        raise SystemExit(
            "the run lacks the rows of " + "; ".join(missing) + ": run `make bench-headline` whole"
        )
    used = [r for r in rows.values() if any(r["group"] == p.group for p in HOT_PATHS)]
    loads = [r["load"] for r in used if r.get("load") is not None]
    peaks = [r["peak_gflops"] for r in used]
    machine = report.get("machine_info", {})
    date = report.get("datetime", "")[:10] or "unknown date"
    load = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "n/a"
    chip = machine.get("cuda") or machine.get("processor") or "CPU"
    header = (
        f"Measured by `make bench-headline` in one run on {date} (UTC): torch {machine.get('torch', '?')}, "
        f"{machine.get('threads', '?')} threads on {machine.get('cpu_count', '?')} cores "
        f"({chip}); 1-minute load {load} beside the rows; "
        f"peak GEMM {min(peaks):.0f}–{max(peaks):.0f} GFLOP/s measured beside each row (the MFU denominator)."
    )
    return [
        header,
        "",
        "| hot path | ours | peer | ours / peer | goal |",
        "|---|---|---|---|---|",
        *lines,
    ]


def replace_section(readme: str, lines: list[str]) -> str:
    """``readme`` with the text between BEGIN and END replaced by ``lines``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise SystemExit(f"the README needs one {BEGIN!r} line followed by one {END!r} line")
    before, rest = readme.split(BEGIN)
    _, after = rest.split(END)
    return before + BEGIN + "\n" + "\n".join(lines) + "\n" + END + after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="pytest-benchmark JSON of a `make bench-headline` run")
    parser.add_argument("readme", type=Path, help="the README whose speed table is rewritten")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        raise SystemExit(f"no benchmark report at {args.report}: run `make bench-headline` first")
    lines = table(json.loads(args.report.read_text()))
    text = replace_section(args.readme.read_text(), lines)
    partial = args.readme.with_name(args.readme.name + ".partial")
    partial.write_text(text)
    partial.replace(args.readme)  # atomic: the README is never half written
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark conventions shared by every suite in benchmarks/.

* ``make bench`` runs the suite at full size with timing on and writes ``benchmarks/results.json``
  plus the readable table ``benchmarks/results.md``; ``make test`` runs each benchmark once at tiny
  size (``--benchmark-disable``) so none of them rots.
* A benchmark calls the ``measure`` fixture: it times the call, and records the figure a user
  cares about (images/s, tokens/s, …), the model FLOP utilisation when FLOPs are given, and the
  ``group``/``impl`` pair so the report puts ours beside the peer and prints the ratio.
  ``measure_interleaved`` does the same for several implementations at once, alternating them round
  by round (for steps that take seconds).
* The MFU denominator is the machine's peak (best large GEMM: fp32 matmul or core's oneDNN linear on
  CPU, bf16 on CUDA) measured beside each measurement, right before and right after it, keeping the
  best of the two: a peak measured once per session let a busy moment at the start inflate every
  later MFU (306% for DiT-B/2).
  Each row also records the 1-minute load average, and a row whose MFU still reads above 100% is
  flagged invalid (``"valid": false``, no MFU figure) instead of reported as a number.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest
import torch

from latentforge_core.linear import linear

RESULTS = Path(__file__).parent / "results.md"
_rows: list[dict] = []


def _full(config) -> bool:
    """Timing on (``--benchmark-enable`` overrides the ``--benchmark-disable`` of addopts)."""
    return config.getoption("benchmark_enable", default=False) or not config.getoption(
        "benchmark_disable", default=True
    )


@pytest.fixture(scope="session")
def full(request) -> bool:
    """True under ``make bench`` (real sizes); False in the test run (tiny sizes, one call)."""
    return _full(request.config)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_peak_gflops(device: torch.device, full: bool) -> float:
    """Best square-GEMM GFLOP/s on this machine now: fp32 on CPU, bf16 on CUDA (the MFU denominator).

    The best over several sizes and repeats: one size alone under-reads the peak when its blocking
    suits the cache poorly.  The tiny run (not ``full``) times one small matmul, only to stay fast.
    """
    if full:
        sizes: tuple[int, ...] = (1024, 2048, 3072, 4096) + ((8192,) if device.type == "cuda" else ())
    else:
        sizes = (128,)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Every GEMM path ours may take: on CPU core's oneDNN linear beats MKL's matmul on some machines
    # (AMD: ~1.8×), and a peak below the fastest path would read an MFU above 100%.
    gemms = [torch.matmul] + ([linear] if device.type == "cpu" else [])
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for gemm in gemms:
            gemm(a, b)  # warm-up: thread pool, allocator, cuBLAS heuristics, oneDNN primitives
            for _ in range(3 if full else 1):
                _sync(device)
                start = time.perf_counter()
                gemm(a, b)
                _sync(device)
                best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _load() -> float | None:
    """The machine's 1-minute load average now (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _beside_peak(device: torch.device, full: bool, measurement):
    """Run ``measurement()`` between two peak measurements → (its result, best peak, load after)."""
    before = measure_peak_gflops(device, full)
    result = measurement()
    after = measure_peak_gflops(device, full)
    return result, max(before, after), _load()


def _row(
    group: str,
    impl: str,
    unit: str,
    items: int,
    seconds: float,
    flops: float | None,
    peak: float,
    load: float | None,
) -> dict:
    """One result row; ``valid`` is False when the MFU reads above 100% (the peak was under-read)."""
    row: dict = {
        "group": group,
        "impl": impl,
        "unit": unit,
        "items": items,
        "throughput": items / seconds,
        "peak_gflops": peak,
        "load": load,
        "valid": True,
    }
    if flops is not None:
        row["gflops"] = flops / seconds / 1e9
        mfu = row["gflops"] / peak
        if mfu > 1.0:
            row["valid"] = False
            row["mfu"] = None
            row["invalid"] = (
                "MFU above 100%: the peak beside it was under-read (busy machine?) or the FLOP count is wrong"
            )
        else:
            row["mfu"] = mfu
    return row


@pytest.fixture
def measure(benchmark, full, device):
    """``measure(fn, group=, impl=, items=, unit=, flops=None)`` → fn's result.

    ``items`` is how many images/tokens one call processes; ``flops`` how many FLOPs it costs
    (2 per multiply-add). ``impl`` is "ours" or the peer's name; rows of one ``group`` are compared.
    """

    def run(fn, *, group: str, impl: str, items: int, unit: str, flops: float | None = None, rounds: int = 3):
        def call():
            out = fn()
            _sync(device)
            return out

        benchmark.group = group
        result, peak, load = _beside_peak(
            device,
            full,
            lambda: benchmark.pedantic(call, rounds=rounds if full else 1, warmup_rounds=1 if full else 0),
        )
        info = {"group": group, "impl": impl, "unit": unit, "items": items}
        stats = getattr(benchmark, "stats", None)
        if stats is not None and stats.stats is not None:
            info = _row(group, impl, unit, items, stats.stats.median, flops, peak, load)
            _rows.append(info)
        benchmark.extra_info.update(info)
        return result

    return run


@pytest.fixture
def measure_interleaved(benchmark, full, device):
    """``measure_interleaved({impl: fn, ...}, group=, items=, unit=, flops=None, rounds=5)``.

    For long steps on a shared machine: each round calls every implementation once, in turn, so a
    change in the machine's load or memory state during the run hits all of them alike (separate
    tests minutes apart measured ratios that drifted by 20%).  Each implementation's figure is the
    median of its own per-call times; pytest-benchmark times the whole round.

    ``flops`` is one call's cost, or ``{impl: cost}`` where the implementations differ (an adaptive
    solver's evaluations).
    """

    def run(
        fns: dict,
        *,
        group: str,
        items: int,
        unit: str,
        flops: float | dict[str, float] | None = None,
        rounds: int = 5,
    ):
        seconds: dict[str, list[float]] = {impl: [] for impl in fns}

        def one_round():
            for impl, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                seconds[impl].append(time.perf_counter() - start)

        benchmark.group = group
        _, peak, load = _beside_peak(
            device,
            full,
            lambda: benchmark.pedantic(
                one_round, rounds=rounds if full else 1, warmup_rounds=1 if full else 0
            ),
        )
        if getattr(benchmark, "stats", None) is None or benchmark.stats.stats is None:
            return  # timing disabled: the tiny run only checks that every implementation runs
        for impl, times in seconds.items():
            median = sorted(times[-rounds:])[rounds // 2]  # the warm-up round is dropped
            cost = flops.get(impl) if isinstance(flops, dict) else flops
            row = _row(group, impl, unit, items, median, cost, peak, load)
            _rows.append(row)
            benchmark.extra_info[impl] = row

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["processor"] = platform.processor() or platform.machine()
    machine_info["cpu_count"] = os.cpu_count()


HEADER = "| group | impl | throughput | GFLOP/s | peak GFLOP/s | MFU | ours / peer | load | measured |"
SEPARATOR = "|---" * HEADER.count(" |") + "|"
INVALID = "**invalid** (MFU > 100%)"


def _earlier_rows(results: Path, groups: set[str]) -> list[str]:
    """Table rows of results.md from earlier runs whose group this run did not measure.

    Rows in another layout (before the peak was measured beside each group) are dropped: their MFU
    came from a peak measured once per session and cannot be trusted.
    """
    if not results.exists():
        return []
    columns = HEADER.count("|")
    rows = [
        line
        for line in results.read_text().splitlines()
        if line.startswith("| ") and line != HEADER and line.count("|") == columns
    ]
    return [row for row in rows if row.split("|")[1].strip() not in groups]


def _table_lines(rows: list[dict], when: str) -> list[str]:
    """This run's rows as table lines, grouped; an invalid row shows the flag, not an MFU figure."""
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    lines = []
    for group, group_rows in sorted(by_group.items()):
        ours = next((r for r in group_rows if r["impl"] == "ours"), None)
        for r in group_rows:
            ratio = ""
            if ours is not None and r is not ours:
                ratio = f"{ours['throughput'] / r['throughput']:.2f}x"
            gf = f"{r['gflops']:.1f}" if "gflops" in r else ""
            if not r.get("valid", True):
                mfu = INVALID
            else:
                mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else ""
            speed = f"{r['throughput']:.2f} {r['unit']}"
            peak = f"{r['peak_gflops']:.1f}"
            load = f"{r['load']:.2f}" if r.get("load") is not None else "n/a"
            lines.append(
                f"| {group} | {r['impl']} | {speed} | {gf} | {peak} | {mfu} | {ratio} | {load} | {when} |"
            )
    return lines


def _write_results(rows: list[dict], results: Path) -> list[str]:
    """Merge this run's rows into ``results`` (rows of unmeasured groups are kept) → this run's lines."""
    lines = _table_lines(rows, time.strftime("%Y-%m-%d", time.gmtime()))
    groups = {row["group"] for row in rows}
    merged = sorted(lines + _earlier_rows(results, groups), key=lambda row: row.split("|")[1].strip())
    results.write_text(
        f"# Benchmark results\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"each group is replaced when its benchmark runs again (the last column says when). "
        f"Peak GFLOP/s is the best square GEMM (fp32 matmul or oneDNN linear on CPU, bf16 on CUDA) "
        f"measured right before "
        f"and right after each row's measurement, the MFU denominator; load is the 1-minute load "
        f"average just after it (the machine has {os.cpu_count()} cores). A row whose MFU reads "
        f"above 100% is marked {INVALID} (peak under-read or FLOP count wrong), and no MFU is reported.\n\n"
        + "\n".join([HEADER, SEPARATOR, *merged])
        + "\n"
    )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print this run's table and merge it into results.md."""
    if not _full(config) or not _rows:
        return
    lines = _write_results(_rows, RESULTS)
    terminalreporter.write_line("")
    terminalreporter.write_line("\n".join([HEADER, SEPARATOR, *lines]))
    invalid = sum(not row["valid"] for row in _rows)
    if invalid:
        terminalreporter.write_line(
            f"{invalid} row(s) invalid: MFU above 100% (peak under-read or FLOP count wrong)", red=True
        )
    terminalreporter.write_line(f"(merged into {RESULTS}; {len(_rows)} rows this run)")

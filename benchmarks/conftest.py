"""Benchmark conventions shared by every suite in benchmarks/.

* ``make bench`` runs the suite at full size with timing on and writes ``benchmarks/results.json``
  plus the readable table ``benchmarks/results.md``; ``make test`` runs each benchmark once at tiny
  size (``--benchmark-disable``) so none of them rots.
* A benchmark calls the ``measure`` fixture: it times the call, and records the figure a user
  cares about (images/s, tokens/s, …), the model FLOP utilisation when FLOPs are given (against a
  peak measured here by a large fp32 matmul in the same run), and the ``group``/``impl`` pair so the
  report puts ours beside the peer and prints the ratio.  ``measure_interleaved`` does the same for
  several implementations at once, alternating them round by round (for steps that take seconds).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def peak_gflops(full, device) -> float:
    """Best fp32 matmul GFLOP/s on this machine now (bf16 on CUDA), the MFU denominator.

    The best over several square sizes and repeats: one size alone under-reads the peak when its
    blocking suits the cache poorly, which showed as MFU above 100% for well-fused models.
    """
    sizes = (1024, 2048, 3072, 4096) if full else (256,)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: thread pool, allocator
        for _ in range(5 if full else 1):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _row(
    group: str, impl: str, unit: str, items: int, seconds: float, flops: float | None, peak: float
) -> dict:
    row = {"group": group, "impl": impl, "unit": unit, "items": items, "throughput": items / seconds}
    if flops is not None:
        row["gflops"] = flops / seconds / 1e9
        row["mfu"] = row["gflops"] / peak
    return row


@pytest.fixture
def measure(benchmark, peak_gflops, full, device):
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
        result = benchmark.pedantic(call, rounds=rounds if full else 1, warmup_rounds=1 if full else 0)
        info = {"group": group, "impl": impl, "unit": unit, "items": items}
        stats = getattr(benchmark, "stats", None)
        if stats is not None and stats.stats is not None:
            info = _row(group, impl, unit, items, stats.stats.median, flops, peak_gflops)
            _rows.append(info)
        benchmark.extra_info.update(info)
        return result

    return run


@pytest.fixture
def measure_interleaved(benchmark, peak_gflops, full, device):
    """``measure_interleaved({impl: fn, ...}, group=, items=, unit=, flops=None, rounds=5)``.

    For long steps on a shared machine: each round calls every implementation once, in turn, so a
    change in the machine's load or memory state during the run hits all of them alike (separate
    tests minutes apart measured ratios that drifted by 20%).  Each implementation's figure is the
    median of its own per-call times; pytest-benchmark times the whole round.
    """

    def run(fns: dict, *, group: str, items: int, unit: str, flops: float | None = None, rounds: int = 5):
        seconds: dict[str, list[float]] = {impl: [] for impl in fns}

        def one_round():
            for impl, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                seconds[impl].append(time.perf_counter() - start)

        benchmark.group = group
        benchmark.pedantic(one_round, rounds=rounds if full else 1, warmup_rounds=1 if full else 0)
        if getattr(benchmark, "stats", None) is None or benchmark.stats.stats is None:
            return  # timing disabled: the tiny run only checks that every implementation runs
        for impl, times in seconds.items():
            median = sorted(times[-rounds:])[rounds // 2]  # the warm-up round is dropped
            row = _row(group, impl, unit, items, median, flops, peak_gflops)
            _rows.append(row)
            benchmark.extra_info[impl] = row

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["processor"] = platform.processor() or platform.machine()
    machine_info["cpu_count"] = os.cpu_count()


HEADER = "| group | impl | throughput | GFLOP/s | MFU | ours / peer | measured |"


def _earlier_rows(groups: set[str]) -> list[str]:
    """Table rows of results.md from earlier runs whose group this run did not measure."""
    if not RESULTS.exists():
        return []
    rows = [line for line in RESULTS.read_text().splitlines() if line.startswith("| ") and line != HEADER]
    return [row for row in rows if row.split("|")[1].strip() not in groups and not row.startswith("|---")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print this run's table and merge it into results.md (rows of unmeasured groups are kept)."""
    if not _full(config) or not _rows:
        return
    by_group: dict[str, list[dict]] = {}
    for row in _rows:
        by_group.setdefault(row["group"], []).append(row)
    when = time.strftime("%Y-%m-%d", time.gmtime()) + f", load {os.getloadavg()[0]:.1f}"
    lines = []
    for group, rows in sorted(by_group.items()):
        ours = next((r for r in rows if r["impl"] == "ours"), None)
        for r in rows:
            ratio = ""
            if ours is not None and r is not ours:
                ratio = f"{ours['throughput'] / r['throughput']:.2f}x"
            gf = f"{r['gflops']:.1f}" if "gflops" in r else ""
            mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else ""
            speed = f"{r['throughput']:.2f} {r['unit']}"
            lines.append(f"| {group} | {r['impl']} | {speed} | {gf} | {mfu} | {ratio} | {when} |")
    merged = sorted(lines + _earlier_rows(set(by_group)), key=lambda row: row.split("|")[1].strip())
    separator = "|---" * 7 + "|"
    RESULTS.write_text(
        f"# Benchmark results\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"each group is replaced when its benchmark runs again (the last column says when, and the "
        f"1-minute load average then: the machine has {os.cpu_count()} cores).\n\n"
        + "\n".join([HEADER, separator, *merged])
        + "\n"
    )
    terminalreporter.write_line("")
    terminalreporter.write_line("\n".join([HEADER, separator, *lines]))
    terminalreporter.write_line(f"(merged into {RESULTS}; {len(_rows)} rows this run)")

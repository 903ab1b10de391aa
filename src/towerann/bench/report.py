"""Benchmark output: one JSON file and one PNG per run, and a few shared measuring helpers.

Every result that `write_report` writes carries a run record, `"run"`, so that a number can be read
beside what it ran on:

- `commit`: `git rev-parse HEAD` of the source tree the towerann package was imported from (null when it
  is not a git checkout, e.g. an installed wheel), and `dirty`: whether tracked or untracked, not ignored
  files under src/towerann differ from that commit (null when unknown);
- `load_average_before` / `load_average_after`: `os.getloadavg()` (1, 5, 15 minutes) when the run began
  and when the report was written. "Began" is the last call of `begin_run()` in this process; a bench that
  does not call it gets the moment this module was first imported or, for a second report in the same
  process, the moment the previous report was written (`load_average_before_source` says which,
  `load_average_before_at` when);
- `ceilings`: this machine's SGEMM rate on 1 thread and on all cores and its memory-copy bandwidth,
  measured when the report is written (the same measurements as `towerann bench machine`, at small sizes:
  about a second).
  `write_report(..., ceilings=False)`, or the environment variable TOWERANN_BENCH_NO_CEILINGS=1, skips the
  measurement (tests) and records null.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import write_json_atomic
from towerann.errors import BackendUnavailable, ConfigError

# Set to 1 (or true/yes) to skip measuring the machine's ceilings in every report of this process.
NO_CEILINGS_ENV = "TOWERANN_BENCH_NO_CEILINGS"
# Sizes of the ceiling measurements in a run record: small enough to cost about a second in all.
CEILING_SGEMM_N = 1024
CEILING_COPY_MIB = 64
CEILING_REPEATS = 3


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_average() -> list[float] | None:
    """os.getloadavg() (1, 5, 15 minutes), rounded to 0.01; None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class RunStart:
    """The load average when a benchmark run began, when it was taken, and what took it."""

    load_average: list[float] | None
    at: str
    source: str  # "begin_run", "module import" or "previous report"


def _take_start(source: str) -> RunStart:
    return RunStart(load_average=load_average(), at=_utc_now(), source=source)


_run_start = _take_start("module import")


def begin_run() -> RunStart:
    """Mark the start of a benchmark run: the next `write_report` in this process records the load
    average taken now as `load_average_before`. Call it before the run does any work."""
    global _run_start
    _run_start = _take_start("begin_run")
    return _run_start


def source_commit() -> dict[str, Any]:
    """{"commit": HEAD of the git checkout holding this package, "dirty": src/towerann differs from it};
    both None when the package is not a tracked file of a git checkout or git cannot tell."""
    package = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:  # an installed copy, not a checkout
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--", ".")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def sgemm_gflops(threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n x n float32 matmul in torch (MKL), on `threads` threads (default: all cores)."""
    import torch  # lazily: writing a report needs no torch unless the ceilings are measured

    if n < 1 or repeats < 1:
        raise ConfigError(f"n and repeats must be >= 1 (got {n}, {repeats})")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up: thread pool start, page faults
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2.0 * n**3 / float(np.median(times)) / 1e9


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Median GB/s of a numpy copy of a `mib` MiB array, counting bytes read plus bytes written."""
    if mib < 1 or repeats < 1:
        raise ConfigError(f"mib and repeats must be >= 1 (got {mib}, {repeats})")
    src = np.ones(mib * (1 << 20) // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # warm-up: fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2.0 * src.nbytes / float(np.median(times)) / 1e9


def measure_ceilings() -> dict[str, Any]:
    """This machine's SGEMM GFLOP/s (1 thread, all cores) and memory-copy GB/s, at the small sizes above
    (`towerann bench machine` measures the same at its own sizes)."""
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "sgemm_gflops_1_thread": sgemm_gflops(1, CEILING_SGEMM_N, CEILING_REPEATS),
        "sgemm_gflops_all_cores": sgemm_gflops(None, CEILING_SGEMM_N, CEILING_REPEATS),
        "memory_bandwidth_gbs": memory_bandwidth_gbs(CEILING_COPY_MIB, CEILING_REPEATS),
        "sgemm_n": CEILING_SGEMM_N,
        "copy_mib": CEILING_COPY_MIB,
        "cores": os.cpu_count(),
    }
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _ceilings_wanted(ceilings: bool | None) -> bool:
    if ceilings is not None:
        return ceilings
    return os.environ.get(NO_CEILINGS_ENV, "").strip().lower() not in ("1", "true", "yes")


def run_record(ceilings: bool | None = None, start: RunStart | None = None) -> dict[str, Any]:
    """The "run" record of a result (see the module's docstring): commit, load before and after, ceilings.
    `ceilings`: measure them (True), record null (False), or measure unless TOWERANN_BENCH_NO_CEILINGS is
    set (None). `start`: the run's start (default: the last `begin_run()`, see above)."""
    start = start or _run_start
    after = load_average()  # before the ceilings: measuring them loads the machine
    return {
        **source_commit(),
        "load_average_before": start.load_average,
        "load_average_before_at": start.at,
        "load_average_before_source": start.source,
        "load_average_after": after,
        "ceilings": measure_ceilings() if _ceilings_wanted(ceilings) else None,
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return info


def percentiles(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p99/p99.9/mean in milliseconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "p999_ms": float("nan"),
            "mean_ms": float("nan"),
            "n": 0,
        }
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "p999_ms": float(p999),
        "mean_ms": float(a.mean()),
        "n": int(a.size),
    }


def write_report(
    out_dir: str | Path,
    name: str,
    result: dict[str, Any],
    plot: Callable[[Any], None] | None = None,
    *,
    ceilings: bool | None = None,
    run_start: RunStart | None = None,
) -> tuple[Path, Path | None]:
    """Write out_dir/name.json (with machine info, a timestamp and the run record: commit, load average
    before and after, the machine's ceilings) and, given a plot function, name.png. `ceilings` and
    `run_start`: see `run_record`."""
    global _run_start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "created_at": _utc_now(),
        "machine": machine_info(),
        **result,
        "run": run_record(ceilings, run_start),
    }
    json_path = out_dir / f"{name}.json"
    write_json_atomic(json_path, result)
    _run_start = _take_start("previous report")  # the next report of this process starts from here
    png_path = None
    if plot is not None:
        try:
            import matplotlib
        except ImportError as e:
            raise BackendUnavailable(f"plots need matplotlib: pip install 'towerann[bench]' ({e})") from e
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(10, 6))
        plot(fig)
        fig.tight_layout()
        png_path = out_dir / f"{name}.png"
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    return json_path, png_path


def print_json(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, default=float))

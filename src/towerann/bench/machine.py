"""`towerann bench machine`: this machine's ceilings - f32 GEMM rate and memory bandwidth.

Other benchmarks divide their own rates by these (measured in the same run), so a number like
"the item tower reaches 70% of SGEMM" means something on any machine.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

from towerann.bench.report import write_report
from towerann.errors import ConfigError


def sgemm_gflops(threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of an n x n x n float32 matmul in torch (MKL), on `threads` threads (default: all cores)."""
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


def threadpools() -> list[dict[str, Any]]:
    """BLAS/OpenMP pools loaded in this process (threadpoolctl), which decide the GEMM rate."""
    from threadpoolctl import threadpool_info

    return threadpool_info()


def measure(n: int = 2048, repeats: int = 5, mib: int = 256) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {
        "sgemm_n": n,
        "sgemm_gflops_all_cores": sgemm_gflops(None, n, repeats),
        "sgemm_gflops_1_thread": sgemm_gflops(1, n, repeats),
        "memory_bandwidth_gbs": memory_bandwidth_gbs(mib, repeats),
        "copy_mib": mib,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch_blas": torch.backends.mkl.is_available() and "mkl" or "other",
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "threadpools": threadpools(),
    }
    result["sgemm_scaling"] = result["sgemm_gflops_all_cores"] / max(result["sgemm_gflops_1_thread"], 1e-9)
    return result


def _plot(result: dict[str, Any]):  # type: ignore[no-untyped-def]
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        ax1.bar(
            ["1 thread", f"{result['cores']} threads"],
            [result["sgemm_gflops_1_thread"], result["sgemm_gflops_all_cores"]],
        )
        ax1.set_ylabel("GFLOP/s")
        ax1.set_title(f"SGEMM {result['sgemm_n']}^3 (torch)")
        ax2.bar(["copy"], [result["memory_bandwidth_gbs"]])
        ax2.set_ylabel("GB/s (read + write)")
        ax2.set_title(f"memory bandwidth ({result['copy_mib']} MiB copy)")

    return draw


def run(args: argparse.Namespace) -> int:
    result = measure(n=args.n, repeats=args.repeats)
    json_path, png_path = write_report(args.out, "machine", result, _plot(result))
    print(
        f"SGEMM: {result['sgemm_gflops_all_cores']:.1f} GFLOP/s on {result['cores']} cores, "
        f"{result['sgemm_gflops_1_thread']:.1f} on 1; memory copy: {result['memory_bandwidth_gbs']:.1f} GB/s"
    )
    print(f"wrote {json_path} and {png_path}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("machine", help="this machine's SGEMM GFLOP/s and memory bandwidth (the ceilings)")
    p.add_argument("--n", type=int, default=2048, help="matrix size of the SGEMM (default 2048)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--out", default="bench-results", help="directory for machine.json and machine.png")
    p.set_defaults(func=run)

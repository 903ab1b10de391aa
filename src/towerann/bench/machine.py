"""`towerann bench machine`: this machine's ceilings - f32 GEMM rate and memory bandwidth.

Other benchmarks divide their own rates by these (measured in the same run), so a number like
"the item tower reaches 70% of SGEMM" means something on any machine. The measurements themselves
(`sgemm_gflops`, `memory_bandwidth_gbs`) are report.py's, which takes them at small sizes for every report.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch

from towerann.bench.options import add_out
from towerann.bench.report import memory_bandwidth_gbs, sgemm_gflops, write_report


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


def _plot(result: dict[str, Any]) -> Callable[[Any], None]:
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
    p = bench_sub.add_parser(
        "machine",
        help="this machine's SGEMM GFLOP/s and memory bandwidth (the ceilings)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=2048, help="matrix size of the SGEMM (default 2048)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    add_out(p, "machine.json and machine.png")
    p.set_defaults(func=run)

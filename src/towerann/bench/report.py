"""Benchmark output: one JSON file and one PNG per run, and a few shared measuring helpers."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from towerann.artifacts import write_json_atomic
from towerann.errors import BackendUnavailable


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
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "p999_ms": float("nan"), "mean_ms": float("nan"), "n": 0}
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999), "mean_ms": float(a.mean()), "n": int(a.size)}


def write_report(out_dir: str | Path, name: str, result: dict[str, Any],
                 plot: Callable[[Any], None] | None = None) -> tuple[Path, Path | None]:
    """Write out_dir/name.json (with machine info and a timestamp) and, given a plot function, name.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(), **result}
    json_path = out_dir / f"{name}.json"
    write_json_atomic(json_path, result)
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

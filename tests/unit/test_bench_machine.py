"""The machine ceilings the benchmarks divide by: positive, finite, and written by the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from towerann.bench.machine import memory_bandwidth_gbs, sgemm_gflops
from towerann.errors import ConfigError


def test_sgemm_gflops_is_positive_and_finite() -> None:
    for threads in (1, None):
        g = sgemm_gflops(threads=threads, n=256, repeats=3)
        assert math.isfinite(g) and g > 0


def test_memory_bandwidth_is_positive_and_finite() -> None:
    g = memory_bandwidth_gbs(mib=8, repeats=3)
    assert math.isfinite(g) and g > 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        sgemm_gflops(n=0)
    with pytest.raises(ConfigError):
        memory_bandwidth_gbs(mib=0)


def test_cli_writes_machine_json(tmp_path: Path) -> None:
    from towerann.cli import main

    assert main(["bench", "machine", "--n", "256", "--repeats", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "machine.json").read_text())
    assert result["sgemm_gflops_all_cores"] > 0 and result["memory_bandwidth_gbs"] > 0
    assert isinstance(result["threadpools"], list)
    assert (tmp_path / "machine.png").stat().st_size > 0

"""The machine ceilings the benchmarks divide by: their arithmetic (on a fake clock), and written by the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from towerann.bench import report
from towerann.bench.report import memory_bandwidth_gbs, sgemm_gflops
from towerann.errors import ConfigError


class FakeClock:
    """perf_counter for the module under test: each timed call takes the next of `spans` seconds. A
    stopwatch comparison on a shared 2-core machine is a coin flip; this checks the arithmetic (flops
    or bytes counted, the median taken) exactly."""

    def __init__(self, spans: list[float]) -> None:
        self.spans, self.now, self.started = list(spans), 0.0, False

    def __call__(self) -> float:
        if self.started:  # the end of a timed call
            self.now += self.spans.pop(0)
        self.started = not self.started
        return self.now


def test_sgemm_gflops_counts_2n3_flops_over_the_median_time(monkeypatch) -> None:
    n = 64
    monkeypatch.setattr(report.time, "perf_counter", FakeClock([0.5, 0.1, 0.3, 9.0, 0.2]))
    assert sgemm_gflops(threads=1, n=n, repeats=5) == pytest.approx(2.0 * n**3 / 0.3 / 1e9)


def test_memory_bandwidth_counts_bytes_read_and_written_over_the_median_time(monkeypatch) -> None:
    mib = 4
    monkeypatch.setattr(report.time, "perf_counter", FakeClock([0.02, 0.01, 0.04]))
    assert memory_bandwidth_gbs(mib=mib, repeats=3) == pytest.approx(2.0 * mib * (1 << 20) / 0.02 / 1e9)


def test_real_measurements_are_positive_and_finite() -> None:
    for value in (
        sgemm_gflops(threads=1, n=128, repeats=3),
        sgemm_gflops(threads=None, n=128, repeats=3),
        memory_bandwidth_gbs(mib=8, repeats=3),
    ):
        assert math.isfinite(value) and value > 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        sgemm_gflops(n=0)
    with pytest.raises(ConfigError):
        memory_bandwidth_gbs(mib=0)


def test_cli_writes_machine_json(tmp_path: Path) -> None:
    from towerann.cli import main

    assert main(["bench", "machine", "--n", "256", "--repeats", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "machine.json").read_text())
    assert result["sgemm_n"] == 256 and result["copy_mib"] == 256
    assert result["sgemm_gflops_all_cores"] > 0 and result["memory_bandwidth_gbs"] > 0
    assert result["sgemm_scaling"] == pytest.approx(result["sgemm_gflops_all_cores"] / result["sgemm_gflops_1_thread"])
    assert isinstance(result["threadpools"], list)
    assert (tmp_path / "machine.png").stat().st_size > 0

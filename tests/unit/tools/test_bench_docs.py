"""docs/benchmarks.md is generated from docs/bench/*.json (tools/bench_docs.py) and stays so; every bench
result records the commit, the load average before and after, and the machine's ceilings."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from towerann.bench import report
from towerann.bench.report import NO_CEILINGS_ENV, begin_run, write_report

ROOT = Path(__file__).resolve().parents[3]
TOOL = ROOT / "tools" / "bench_docs.py"


def bench_docs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_the_committed_page_is_what_the_committed_runs_generate() -> None:
    done = bench_docs("--check")
    assert done.returncode == 0, f"docs/benchmarks.md is stale: run `python tools/bench_docs.py`\n{done.stderr}"


def test_check_fails_naming_the_line_when_a_number_is_edited_by_hand(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("ann-1m-shared.json", "pq-1m-float32.json"):
        shutil.copy(ROOT / "docs" / "bench" / name, bench / name)
    page = tmp_path / "benchmarks.md"
    assert bench_docs("--bench-dir", bench, "--out", page).returncode == 0
    assert bench_docs("--bench-dir", bench, "--out", page, "--check").returncode == 0

    lines = page.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| towerann hnsw | ef="))
    cells = lines[row].split(" | ")
    cells[3] = "0.123"  # the p50 column
    lines[row] = " | ".join(cells)
    page.write_text("\n".join(lines) + "\n")

    done = bench_docs("--bench-dir", bench, "--out", page, "--check")
    assert done.returncode == 1
    assert any(
        f"benchmarks.md:{row + 1}: " in m and "0.123" in m and "ann-1m-shared.json" in m
        for m in done.stderr.splitlines()
    ), done.stderr
    assert "1 difference" in done.stderr


def test_a_report_records_commit_load_and_positive_ceilings(tmp_path: Path) -> None:
    begin_run()
    json_path, png = write_report(tmp_path, "probe", {"items": 3}, ceilings=True)
    result = json.loads(json_path.read_text())
    assert png is None
    assert result["benchmark"] == "probe" and result["items"] == 3 and "created_at" in result and "machine" in result
    run = result["run"]
    package = Path(report.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    tracked = subprocess.run(
        ["git", "-C", str(package), "ls-files", "--error-unmatch", "report.py"], capture_output=True
    )
    if head.returncode == 0 and tracked.returncode == 0:  # a checkout (CI's is a clone): the commit of the code
        assert run["commit"] == head.stdout.strip() and isinstance(run["dirty"], bool)
    else:  # an installed copy
        assert run["commit"] is None and run["dirty"] is None
    assert run["load_average_before_source"] == "begin_run"
    for key in ("load_average_before", "load_average_after"):
        assert len(run[key]) == 3 and all(isinstance(x, float) and x >= 0 for x in run[key])
    ceilings = run["ceilings"]
    for key in ("sgemm_gflops_1_thread", "sgemm_gflops_all_cores", "memory_bandwidth_gbs"):
        assert math.isfinite(ceilings[key]) and ceilings[key] > 0, (key, ceilings)


def test_ceilings_can_be_skipped_and_a_second_report_starts_where_the_first_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NO_CEILINGS_ENV, "1")
    begin_run()
    first = json.loads(write_report(tmp_path, "a", {})[0].read_text())["run"]
    second = json.loads(write_report(tmp_path, "b", {})[0].read_text())["run"]
    assert first["ceilings"] is None and second["ceilings"] is None
    assert first["load_average_before_source"] == "begin_run"
    assert second["load_average_before_source"] == "previous report"
    monkeypatch.delenv(NO_CEILINGS_ENV)
    monkeypatch.setattr(report, "measure_ceilings", lambda: {"sgemm_gflops_1_thread": 1.0})
    assert json.loads(write_report(tmp_path, "c", {})[0].read_text())["run"]["ceilings"] == {
        "sgemm_gflops_1_thread": 1.0
    }


def test_the_page_shows_a_run_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "source_commit", lambda: {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True})
    monkeypatch.setattr(report, "load_average", lambda: [1.25, 0.5, 0.0])
    monkeypatch.setattr(
        report,
        "measure_ceilings",
        lambda: {"sgemm_gflops_1_thread": 50.0, "sgemm_gflops_all_cores": 99.94, "memory_bandwidth_gbs": 12.34},
    )
    begin_run()
    result = {"runtimes": {"onnx": {"tower_call_only": {"p50_ms": 0.0123}}}}
    write_report(tmp_path / "bench", "tower-x", result, ceilings=True)
    page = tmp_path / "benchmarks.md"
    assert bench_docs("--bench-dir", tmp_path / "bench", "--out", page).returncode == 0
    text = page.read_text()
    assert "commit: 0123456789ab (+ uncommitted changes)" in text
    assert "before 1.25 / 0.50 / 0.00; after 1.25 / 0.50 / 0.00" in text
    assert re.search(r"SGEMM 50\.0 GFLOP/s on 1 thread, 99\.9 GFLOP/s on all cores; memory copy 12\.3 GB/s", text)
    assert "| onnx | 12.3 |" in text

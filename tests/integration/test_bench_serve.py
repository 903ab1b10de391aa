"""`towerann bench serve` end to end on a tiny workload: real server, real load, real click events."""

from __future__ import annotations

import json
from pathlib import Path

from towerann.cli import main


def test_bench_serve_reports_rates_stages_and_event_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "bench",
            "serve",
            "--items",
            "2000",
            "--users",
            "300",
            "--dim",
            "16",
            "--kind",
            "exact",
            "--store",
            "embedded",
            "--rates",
            "50",
            "--duration",
            "1",
            "--events",
            "20",
            "--inproc-requests",
            "50",
            "--k",
            "50",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(next(out.glob("serve-2000-k50-exact-embedded.json")).read_text())
    rate = result["http"][0]
    assert rate["errors"] == {} and rate["ok"] == rate["sent"] > 0
    assert set(rate["stages"]) == {"features", "user_tower", "ann", "total"}
    assert result["event_write"]["n"] == 20 and 0 < result["event_write"]["p50_ms"] <= result["event_write"]["p99_ms"]
    assert result["in_process"]["requests"] == 50
    mem = result["server_memory_after_load"]  # the served process's own numbers, read from /proc
    assert 0 < mem["RssAnon"] <= mem["VmRSS"] <= mem["VmHWM"]
    assert (out / "serve-2000-k50-exact-embedded.png").stat().st_size > 0

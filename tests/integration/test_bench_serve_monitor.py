"""`towerann bench serve --monitor-sample`: the same load on a server with the recall monitor and one
without it, rate by rate, and what the monitor measured."""

from __future__ import annotations

import json
from pathlib import Path

from towerann.cli import main


def test_bench_serve_compares_p99_with_and_without_the_monitor(tmp_path: Path) -> None:
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
            "5",
            "--inproc-requests",
            "20",
            "--k",
            "20",
            "--monitor-sample",
            "0.5",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(next(out.glob("serve-2000-k20-exact-embedded.json")).read_text())
    on, off = result["http"], result["http_monitor_off"]
    assert len(on) == len(off) == 1 and on[0]["ok"] == on[0]["sent"] and off[0]["ok"] == off[0]["sent"] > 0
    monitor = result["monitor"]
    assert monitor["sample"] == 0.5
    assert monitor["p99_with_over_without"] == [
        round(on[0]["end_to_end"]["p99_ms"] / off[0]["end_to_end"]["p99_ms"], 3)
    ]
    metrics = monitor["metrics"]
    # about half of the ~550 requests (warm-up included) sampled; an exact index answers exactly
    count = sum(v for name, v in metrics.items() if name.startswith("towerann_recall_sample_count{"))
    dropped = sum(v for name, v in metrics.items() if name.startswith("towerann_recall_samples_dropped_total{"))
    assert 100 < count + dropped < 450, metrics
    assert all(v == 1.0 for name, v in metrics.items() if name.startswith("towerann_recall{")), metrics

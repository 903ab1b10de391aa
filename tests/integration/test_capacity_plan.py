"""`towerann plan`: the byte model against a built index's own accounting, node arithmetic, and the
latency curve read from bench JSON (measured sizes returned as measured, others scaled and labelled)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from towerann.bench.capacity import bytes_per_item, parse_bytes, plan
from towerann.index import create


def test_the_byte_model_matches_what_a_loaded_ivfpq_holds(tmp_path):
    from towerann.index.snapshot import load_snapshot, publish

    n, d, pq_m = 60_000, 32, 4
    ix = create("ivfpq", d, pq_m=pq_m, nlist=int(round(4 * math.sqrt(n))), train_sample=10_000)
    ix.build(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32), np.arange(n))
    loaded = load_snapshot(publish(ix, tmp_path, "m"))
    measured = loaded.memory()
    model = bytes_per_item("ivfpq", n, d, pq_m, code_bytes=1)  # no categories: 1-byte codes (all -1)
    assert model["resident"] == pytest.approx(measured["resident_bytes_per_item"], rel=0.05), (model, measured)
    assert model["vectors_on_disk"] == measured["disk_bytes_per_item"]


def _curve(tmp_path, points):
    (tmp_path / "pq-a.json").write_text(json.dumps({"dataset": {"items": 1_000_000}, "points": points[0]}))
    (tmp_path / "pq-b.json").write_text(json.dumps({"dataset": {"items": 10_000_000}, "points": points[1]}))


def _pt(p50, recall=0.96, k=1000, mode="warm", pq_m=16):
    return {
        "pq_m": pq_m,
        "mode": mode,
        "k": k,
        "params": {"nprobe": 64},
        "recall": recall,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
    }


def test_nodes_and_latency_from_measured_curves(tmp_path):
    # 1M: the fast point misses the recall target, so the slower one counts; 10M: 4x slower.
    _curve(tmp_path, [[_pt(0.5, recall=0.90), _pt(1.0)], [_pt(4.0), _pt(9.0, mode="cold")]])
    one = plan(1e6, 128, "ivfpq", 64e9, bench_dir=tmp_path)
    assert one["nodes"] == 1 and one["per_node_latency"]["p50_ms"] == 1.0
    assert "measured" in one["per_node_latency"]["basis"]
    big = plan(1e9, 128, "ivfpq", 64e9, bench_dir=tmp_path)
    assert big["nodes"] == math.ceil(1e9 * big["resident_bytes_per_item"] / (64e9 * big["headroom"]))
    assert big["nodes"] * big["items_per_node"] == pytest.approx(1e9)
    alpha = math.log(4.0) / math.log(10)  # fitted on the two sizes
    lat = big["per_node_latency"]
    assert lat["p50_ms"] == pytest.approx(4.0 * (big["items_per_node"] / 1e7) ** alpha)
    assert lat["p99_ms"] == pytest.approx(2 * lat["p50_ms"]) and "extrapolated" in lat["basis"]
    cold = plan(1e7, 128, "ivfpq", 64e9, mode="cold", bench_dir=tmp_path)
    assert cold["per_node_latency"]["p50_ms"] == 9.0
    none = plan(1e7, 128, "ivfpq", 64e9, recall=0.99, bench_dir=tmp_path)
    assert none["per_node_latency"]["p50_ms"] is None


def test_bad_sizes_get_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "towerann.cli", "plan", "--items", "1e9", "--ram-per-node", "lots"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--ram-per-node" in out.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64GB", 64e9), ("512 GiB", 512 * 2**30), ("1.5TB", 1.5e12), ("2e3MB", 2e9), ("100B", 100.0)],
)
def test_sizes_with_a_unit_are_read(text: str, expected: float) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(("text", "said"), [("64", "--ram-per-node 64: give a unit, e.g. 64GB"), ("1.5", "1.5GB")])
def test_a_size_without_a_unit_is_refused_in_one_line(text: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    from towerann.cli import main

    assert main(["plan", "--items", "1e9", "--ram-per-node", text]) == 2
    err = capsys.readouterr().err
    assert said in err and err.strip().count("\n") == 0, err

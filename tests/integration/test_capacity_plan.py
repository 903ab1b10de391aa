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
from towerann.errors import ConfigError
from towerann.index import create


@pytest.mark.parametrize("rerank_dtype", ["float32", "float16", "int8"])
def test_the_byte_model_matches_what_a_loaded_ivfpq_holds(tmp_path, rerank_dtype):
    from towerann.index.snapshot import load_snapshot, publish

    n, d, pq_m = 60_000, 32, 4
    ix = create(
        "ivfpq", d, pq_m=pq_m, nlist=int(round(4 * math.sqrt(n))), train_sample=10_000, rerank_dtype=rerank_dtype
    )
    ix.build(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32), np.arange(n))
    loaded = load_snapshot(publish(ix, tmp_path, "m"))
    measured = loaded.memory()
    model = bytes_per_item("ivfpq", n, d, pq_m, code_bytes=1, rerank_dtype=rerank_dtype)  # no categories: 1-byte codes
    assert model["resident"] == pytest.approx(measured["resident_bytes_per_item"], rel=0.05), (model, measured)
    assert model["vectors_on_disk"] == measured["disk_bytes_per_item"]


def test_without_a_float32_copy_the_byte_model_matches_the_index_and_its_disk_drops(tmp_path):
    from towerann.index.snapshot import load_snapshot, publish

    n, d, pq_m = 30_000, 32, 4
    ix = create("ivfpq", d, pq_m=pq_m, train_sample=10_000, rerank_dtype="float16", keep_float32=False)
    ix.build(np.random.default_rng(1).standard_normal((n, d), dtype=np.float32), np.arange(n))
    measured = load_snapshot(publish(ix, tmp_path, "m")).memory()
    model = bytes_per_item("ivfpq", n, d, pq_m, code_bytes=1, rerank_dtype="float16", keep_float32=False)
    assert model["vectors_on_disk"] == measured["disk_bytes_per_item"] == 2 * d
    assert model["resident"] == pytest.approx(measured["resident_bytes_per_item"], rel=0.05), (model, measured)
    # 100M x 128-d float16: the float32 copy (512 B/item) is what would not fit a 40 GB disk
    lean = plan(1e8, 128, "ivfpq", 24e9, mode="cold", rerank_dtype="float16", keep_float32=False, bench_dir=tmp_path)
    full = plan(1e8, 128, "ivfpq", 24e9, mode="cold", rerank_dtype="float16", bench_dir=tmp_path)
    assert full["disk_bytes_per_item"] - lean["disk_bytes_per_item"] == 512 and lean["disk_bytes_per_node"] < 40e9
    with pytest.raises(ConfigError, match="--no-float32-copy needs --rerank-dtype float16 or int8"):
        bytes_per_item("ivfpq", n, d, keep_float32=False)


def test_the_mode_counts_the_rerank_rows_the_way_the_bytes_say(tmp_path):
    # 1e9 x 128-d on 64 GB nodes: cold holds ~20 B/item; warm and ram also hold the re-rank rows (512 B as
    # float32, 256 as float16, 132 as int8), so they need ~(20 + row) / 20 times the nodes.
    cold = plan(1e9, 128, "ivfpq", 64e9, mode="cold", bench_dir=tmp_path)
    nodes = []
    for dtype, row in [("float32", 512), ("float16", 256), ("int8", 132)]:
        warm = plan(1e9, 128, "ivfpq", 64e9, mode="warm", rerank_dtype=dtype, bench_dir=tmp_path)
        nodes.append(warm["nodes"])
        ram = plan(1e9, 128, "ivfpq", 64e9, mode="ram", rerank_dtype=dtype, bench_dir=tmp_path)
        assert warm["nodes"] == ram["nodes"] == math.ceil(1e9 * (warm["resident_bytes_per_item"] + row) / (64e9 * 0.7))
        assert warm["memory_bytes_per_item"] - warm["resident_bytes_per_item"] == pytest.approx(row, rel=1e-3)
    assert cold["nodes"] == math.ceil(1e9 * cold["resident_bytes_per_item"] / (64e9 * 0.7))
    assert cold["memory_bytes_per_item"] == cold["resident_bytes_per_item"] < 21
    assert nodes[0] > nodes[1] > nodes[2] > cold["nodes"], (nodes, cold["nodes"])


def test_curves_are_read_per_rerank_row_type(tmp_path):
    f16 = {**_pt(3.0), "rerank_dtype": "float16"}
    _curve(tmp_path, [[_pt(1.0), f16], [_pt(4.0)]])
    assert plan(1e6, 128, "ivfpq", 64e9, bench_dir=tmp_path)["per_node_latency"]["p50_ms"] == 1.0
    f16_plan = plan(1e6, 128, "ivfpq", 64e9, rerank_dtype="float16", bench_dir=tmp_path)
    assert f16_plan["per_node_latency"]["p50_ms"] == 3.0 and f16_plan["measured_curve"][0]["items"] == 1_000_000


def test_no_recall_is_stated_far_beyond_the_runs_that_measured_it(tmp_path):
    _curve(tmp_path, [[_pt(1.0)], [_pt(4.0)]])  # 1M and 10M, both reach 0.96
    near = plan(1.5e7, 128, "ivfpq", 1e12, bench_dir=tmp_path)["per_node_latency"]
    assert near["recall"] == 0.96 and "extrapolated" in near["basis"]
    far = plan(1e9, 128, "ivfpq", 1e12, bench_dir=tmp_path)
    assert far["nodes"] == 1 and far["per_node_latency"]["recall"] is None
    assert "recall not measured at this size" in far["per_node_latency"]["basis"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "towerann.cli",
            "plan",
            "--items",
            "1e9",
            "--ram-per-node",
            "1TB",
            "--bench-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "recall not measured at this size" in out.stdout, out.stdout + out.stderr


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
    assert big["nodes"] == math.ceil(1e9 * big["memory_bytes_per_item"] / (64e9 * big["headroom"]))
    assert big["nodes"] * big["items_per_node"] == pytest.approx(1e9)
    alpha = math.log(4.0) / math.log(10)  # fitted on the two sizes
    lat = big["per_node_latency"]
    assert lat["p50_ms"] == pytest.approx(4.0 * (big["items_per_node"] / 1e7) ** alpha)
    assert lat["p99_ms"] == pytest.approx(2 * lat["p50_ms"]) and "extrapolated" in lat["basis"]
    cold = plan(1e7, 128, "ivfpq", 64e9, mode="cold", bench_dir=tmp_path)
    assert cold["per_node_latency"]["p50_ms"] == 9.0
    none = plan(1e7, 128, "ivfpq", 64e9, recall=0.99, bench_dir=tmp_path)
    assert none["per_node_latency"]["p50_ms"] is None and none["per_node_latency"]["recall"] is None


@pytest.mark.parametrize(("flag", "value"), [("--ram-per-node", "lots"), ("--rerank-dtype", "bfloat16")])
def test_bad_options_get_a_one_line_error(flag: str, value: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "towerann.cli", "plan", "--items", "1e9", flag, value],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and flag in out.stderr


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

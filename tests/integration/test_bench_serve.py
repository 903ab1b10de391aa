"""`towerann bench serve` end to end on a tiny workload: real server, real load, real click events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from towerann.cli import main
from towerann.data.vectors_dir import write_vectors
from towerann.freshness.publish import publish_bundle


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


def test_bench_serve_serves_a_published_vectors_only_root_with_query_vectors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--index ROOT --queries FILE: a root built elsewhere (here a vectors-only ivfpq bundle, the shape of
    `bench pq --set generated --publish`) is served as it is, and every request is a query_vector one."""
    rng = np.random.default_rng(0)
    n, dim = 3000, 16
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vdir = write_vectors(
        tmp_path / "vectors",
        vectors,
        np.arange(n),
        np.zeros(n, np.int32),
        np.ones(n, bool),
        ["c"],
        "space-x",
        10_000 + np.arange(n),
    )
    root = tmp_path / "root"
    publish_bundle(root, None, vdir, kind="ivfpq", params={"nlist": 16, "pq_m": 4, "exact_below": 0})
    np.save(tmp_path / "q.npy", rng.standard_normal((40, dim)).astype(np.float32))
    out = tmp_path / "out"
    base = ["bench", "serve", "--index", str(root), "--rates", "40", "--duration", "1", "--k", "20"]
    base += ["--inproc-requests", "30", "--workdir", str(tmp_path), "--out", str(out)]
    assert main([*base, "--queries", str(tmp_path / "q.npy")]) == 0
    result = json.loads((out / "serve-3000-k20-ivfpq-vectors-embedded.json").read_text())
    rate = result["http"][0]
    assert rate["errors"] == {} and rate["ok"] == rate["sent"] == 40
    assert result["requests"] == "query_vector" and result["event_write"] is None
    assert result["index"]["backend"] == "ivfpq" and result["index_root"] == str(root)
    assert result["in_process"]["requests"] == 30
    # a file of the wrong width, or none, is a one-line error (exit code 2) naming what is expected
    np.save(tmp_path / "bad.npy", np.zeros((5, dim + 1), np.float32))
    assert main([*base, "--queries", str(tmp_path / "bad.npy")]) == 2
    assert "expected [n, 16] query vectors" in capsys.readouterr().err
    assert main(base) == 2
    assert "--index ROOT needs --queries" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "serve-3000-k20-ivfpq-vectors-embedded.json",
        "serve-3000-k20-ivfpq-vectors-embedded.png",
    ]


def test_bench_serve_serves_a_published_bundle_to_its_dataset_users(
    tmp_path: Path, serving_bundle: dict[str, Path]
) -> None:
    """--index ROOT --data DATASET: a bundle with its model, served as it is to that dataset's users (user_id
    requests through its own user tower), click events included. The root is this test's own (the session's
    shared one may be bound to another test's delta log by then, which a server refuses to switch)."""
    out = tmp_path / "out"
    root = tmp_path / "root"
    publish_bundle(root, serving_bundle["model"], serving_bundle["vectors"], kind="exact")
    argv = ["bench", "serve", "--index", str(root), "--data", str(serving_bundle["data"])]
    argv += ["--rates", "40", "--duration", "1", "--k", "20", "--events", "10", "--inproc-requests", "30"]
    assert main([*argv, "--workdir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads((out / "serve-2000-k20-exact-users-embedded.json").read_text())
    rate = result["http"][0]
    assert rate["errors"] == {} and rate["ok"] == rate["sent"] == 40
    assert result["requests"] == "user_id" and result["users"] == 1000 and result["event_write"]["n"] == 10
    assert result["dataset"] == str(serving_bundle["data"])


def test_a_root_benched_twice_with_redis_serves_both_times(tmp_path: Path, serving_bundle: dict[str, Path]) -> None:
    """--store redis starts a Redis of the run's own (its data under --workdir), which holds the served
    root's delta log: a run from another work directory on the same root has a new Redis, and its server
    adopts that log instead of refusing to start (the root was bound to the last run's log)."""
    root = tmp_path / "root"
    publish_bundle(root, serving_bundle["model"], serving_bundle["vectors"], kind="exact")
    argv = ["bench", "serve", "--index", str(root), "--data", str(serving_bundle["data"]), "--store", "redis"]
    argv += ["--rates", "20", "--duration", "1", "--k", "10", "--events", "2", "--inproc-requests", "10"]
    for run in ("first", "second"):
        out = tmp_path / run
        assert main([*argv, "--workdir", str(tmp_path / run), "--out", str(out)]) == 0, run
        result = json.loads((out / "serve-2000-k10-exact-users-redis.json").read_text())
        assert result["http"][0]["ok"] == 20, run

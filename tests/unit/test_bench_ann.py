"""`towerann bench ann` in quick mode on tiny clustered data: every backend and peer is measured and reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from towerann.bench.ann import BACKENDS, PEERS, run_ann_bench
from towerann.errors import ConfigError, DataError


def _clustered(n: int, m: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items around cluster centres; queries between centres (like user vectors, not like items)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, dim)).astype(np.float32)
    v = centres[rng.integers(0, 24, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    q = centres[rng.integers(0, 24, m)] * 0.5 + 0.3 * rng.standard_normal((m, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return v, q


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ann")
    v, q = _clustered(3000, 100)
    r = run_ann_bench(v, q, ks=(10, 100), n_queries=100, quick=True, out=out, work=out)
    return r, out


def test_json_has_every_backend_and_peer_with_sane_numbers(result: tuple[dict, Path]) -> None:
    r, out = result
    saved = json.loads((out / "ann.json").read_text())
    assert saved["skipped"] == {}  # all libraries are installed in the dev venv
    names = {s["name"] for s in saved["series"]}
    want = {"towerann exact", "towerann hnsw", "towerann ivfpq", "towerann ivfpq+rerank", "towerann scann",
            "numpy brute force", "faiss HNSWFlat", "faiss IVFPQ", "faiss IVFPQ+RefineFlat", "hnswlib", "ScaNN",
            "LanceDB IVF_PQ+refine"}
    assert names == want
    for name in names:
        for k in (10, 100):
            pts = [p for p in saved["points"] if p["series"] == name and p["k"] == k]
            assert pts, f"no point for {name} at k={k}"
            for p in pts:
                assert 0.0 <= p["recall"] <= 1.0
                assert p["p50_ms"] > 0 and p["p99_ms"] >= p["p50_ms"] and p["qps_batch"] > 0
    for s in saved["series"]:
        assert s["memory_bytes_per_item"] > 0 and s["build_s"] >= 0


def test_exact_recall_is_one_and_ann_recall_grows_with_effort(result: tuple[dict, Path]) -> None:
    r, _ = result
    for p in r["points"]:
        if p["series"] in ("towerann exact", "numpy brute force"):
            assert p["recall"] == pytest.approx(1.0)
            assert p["recall_batch"] == pytest.approx(1.0)
    hnsw = [p["recall"] for p in r["points"] if p["series"] == "towerann hnsw" and p["k"] == 100]
    assert hnsw == sorted(hnsw) and hnsw[-1] > 0.9


def test_overhead_pairs_and_item_query_recall_are_reported(result: tuple[dict, Path]) -> None:
    r, _ = result
    pairs = {(o["series"], o["raw"]) for o in r["overhead"]}
    assert ("towerann hnsw", "faiss HNSWFlat") in pairs
    assert ("towerann ivfpq+rerank", "faiss IVFPQ+RefineFlat") in pairs
    assert all(o["p50_ratio"] > 0 for o in r["overhead"])
    towerann_points = [p for p in r["points"] if p["series"].startswith("towerann")]
    assert all(0.0 <= p["recall_item_queries"] <= 1.0 for p in towerann_points)
    assert set(r["targets"]) and all("met_by" in t for t in r["targets"].values())


def test_png_is_written(result: tuple[dict, Path]) -> None:
    _, out = result
    png = out / "ann.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    v, q = _clustered(500, 10)
    with pytest.raises(ConfigError):
        run_ann_bench(v, q, ks=(10,), backends=("annoy",), peers=(), out=None)
    with pytest.raises(ConfigError):
        run_ann_bench(v, q, ks=(1000,), backends=("exact",), peers=(), out=None)
    with pytest.raises(DataError):
        run_ann_bench(v, q[:, :8], ks=(10,), backends=("exact",), peers=(), out=None)
    assert set(BACKENDS) and set(PEERS)


def test_cli_runs_on_given_vectors(tmp_path: Path) -> None:
    from towerann.cli import main
    from towerann.embed.vectors import write_vectors

    v, q = _clustered(800, 20)
    n = len(v)
    write_vectors(tmp_path / "vec", v, np.arange(n), np.zeros(n, np.int32), np.ones(n, bool), ["c"], "m-test",
                  np.arange(n))
    np.save(tmp_path / "q.npy", q, allow_pickle=False)
    out = tmp_path / "out"
    code = main(["bench", "ann", "--vectors", str(tmp_path / "vec"), "--queries", str(tmp_path / "q.npy"),
                 "--k", "10", "--backends", "exact,hnsw", "--peers", "numpy,faiss", "--quick", "--out", str(out),
                 "--work", str(tmp_path / "work")])
    assert code == 0
    saved = json.loads((out / "ann.json").read_text())
    assert saved["dataset"]["source"]["kind"] == "given" and saved["dataset"]["items"] == n
    assert {s["name"] for s in saved["series"]} >= {"towerann exact", "towerann hnsw", "numpy brute force"}
    assert main(["bench", "ann", "--vectors", str(tmp_path / "vec"), "--out", str(out)]) == 2  # --queries missing

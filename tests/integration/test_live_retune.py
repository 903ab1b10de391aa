"""The live re-tune (serving.retune_loop) on a real server over loopback HTTP, and `index tune --from-live`.

A 25k-item catalog (seeded clustered vectors, dim 32) is served as a vectors-only HNSW bundle tuned to
recall@10 0.95 whose search setting is then set deliberately too low (ef 10: recall ~0.82), with
exact_below=0 so no search is brute force. The recall monitor scores every request (sample 1.0):
- the drop below target triggers exactly one re-tune, which raises the online recall to >= the target,
  publishes a version with retuned_from and its reason, serves it without a reload, counts once in
  /metrics; a second wave of requests at the new setting triggers nothing; `index rollback` undoes it;
- a latency budget no search can meet refuses the re-tune: the old settings and version stay, the refusal
  is counted and logged, /readyz says the target is unrestorable, and the cooldown holds the next one;
- a graph too sparse to reach the target at any setting is refused on recall and reported (no rebuild:
  this server has no dataset to rebuild from);
- `index tune --from-live` re-tunes a root from the reservoir a server saved, and says in one line why not
  when there is none or too few.
Tuning is timed by the fixed cost model (tests/conftest.py tuner_cost_ms); the held-out p99 is measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import pytest
from ann_catalog import AUTH, TOKEN

from towerann.cli import main
from towerann.config import (
    Config,
    FeaturesConfig,
    FreshnessConfig,
    MonitorConfig,
    PathsConfig,
    RetuneConfig,
    ServeConfig,
)
from towerann.data.vectors_dir import write_vectors
from towerann.freshness.publish import publish_bundle
from towerann.index.build import build_index
from towerann.index.retune import read_live_queries
from towerann.index.snapshot import current_version, load_snapshot, read_checked_manifest
from towerann.index.tune import recall_at_k, tune
from towerann.server.server import ServerHandle, start_background
from towerann.serving.monitor import LiveQueries

N, DIM, CLUSTERS, K = 25_000, 32, 64, 10
TARGET = 0.95
JUDGED = 150  # [retune] samples
TOO_LOW_EF = 10


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("live-retune")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLUSTERS, DIM))
    cluster = rng.integers(0, CLUSTERS, N)
    vectors = _unit(centers[cluster] + 0.35 * rng.normal(size=(N, DIM)))
    ids = np.arange(N, dtype=np.int64)
    vdir = write_vectors(
        tmp / "vectors",
        vectors,
        ids,
        (cluster % 8).astype(np.int32),
        np.ones(N, bool),
        [f"c{i}" for i in range(8)],
        "external-live-retune",
        900_000 + ids,
    )
    return {"tmp": tmp, "vectors": vectors, "dir": vdir, "centers": centers}


def queries(cat: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """User-like queries: near a cluster centre, not on an item."""
    rng = np.random.default_rng(seed)
    return _unit(cat["centers"][rng.integers(0, CLUSTERS, n)] + 0.5 * rng.normal(size=(n, DIM)))


def publish_poor(cat: dict[str, Any], root: Path, M: int = 16, ef: int | None = TOO_LOW_EF) -> Path:
    """A vectors-only HNSW bundle tuned to TARGET at K (its tuning record), searching at `ef` (None: as tuned)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a parallel insert gives another graph from run to run
    try:
        n = len(cat["vectors"])
        index = build_index(
            cat["vectors"],
            np.arange(n),
            np.zeros(n, np.int32),
            np.ones(n, bool),
            kind="hnsw",
            params={"M": M, "ef_construction": 40 if M > 4 else 16, "exact_below": 0},
        )
        tune(index, queries(cat, 300, seed=99), K, TARGET)
        if ef is not None:
            index.search_defaults["ef"] = ef  # deliberately too low for the target
        return publish_bundle(root, None, cat["dir"], index=index, validation_queries=queries(cat, 200, seed=98))
    finally:
        faiss.omp_set_num_threads(before)


def config(cat: dict[str, Any], tmp: Path, root: Path, **retune: Any) -> Config:
    (tmp / "token").write_text(TOKEN + "\n")
    return Config(
        serve=ServeConfig(max_k=1000, max_body_bytes=1 << 20),
        paths=PathsConfig(index=str(root), model=str(tmp / "no-model"), data=str(tmp / "no-data")),
        features=FeaturesConfig(store="memory"),
        freshness=FreshnessConfig(
            token_file=str(tmp / "token"), poll_s=0.0, min_recall=0.5, delta_path=str(tmp / "delta.sqlite")
        ),
        monitor=MonitorConfig(sample=1.0, threshold=0.0, queue=4096, max_busy=1.0, reservoir=2000, reservoir_save_s=0),
        retune=RetuneConfig(**{"samples": JUDGED, "min_queries": 100, "max_p99_ms": 1000.0, **retune}),
    )


@pytest.fixture
def serve(catalog: dict[str, Any], tmp_path: Path, fixed_tuner_costs: None) -> Iterator[Any]:
    handles: list[ServerHandle] = []

    def start(cfg: Config) -> ServerHandle:
        handles.append(start_background(cfg))
        return handles[-1]

    yield start
    for h in handles:
        h.stop()


def ask_all(handle: ServerHandle, qs: np.ndarray) -> list[str]:
    """One HTTP request per query; the index versions that answered."""
    versions = []
    with httpx.Client(base_url=handle.url, timeout=30) as http:
        for q in qs:
            r = http.post("/v1/candidates", json={"query_vector": [float(x) for x in q], "k": K})
            assert r.status_code == 200, r.text
            versions.append(r.json()["index_version"])
    assert handle.retriever is not None and handle.retriever.monitor is not None and handle.retune is not None
    assert handle.retriever.monitor.drain(60) and handle.retune.settle()
    return versions


def metric(url: str, name: str, **labels: str) -> float | None:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.split(" ")[0] == want:
            return float(line.rsplit(" ", 1)[1])
    return None


def online(handle: ServerHandle, version: str) -> dict[str, Any]:
    assert handle.retriever is not None and handle.retriever.monitor is not None
    return handle.retriever.monitor.snapshot()["bundles"][version]["none"]


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def test_a_drop_below_target_triggers_one_retune_that_restores_it(
    catalog: dict[str, Any], tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="towerann.serving.retune_loop")
    root = tmp_path / "indexes"
    old = publish_poor(catalog, root).name
    handle = serve(config(catalog, tmp_path, root))
    holder = handle.retriever.holder
    served = holder.current()
    assert served.index.search_defaults["ef"] == TOO_LOW_EF and served.index.search_defaults["exact_below"] == 0
    assert served.index.tuning["target"] == TARGET and served.index.tuning["k"] == K

    assert set(ask_all(handle, queries(catalog, JUDGED, seed=1))) == {old}
    before = online(handle, old)
    assert before["samples"] == JUDGED and before["recall"] < TARGET - 0.05  # the drop, measured online

    # exactly one re-tune, applied, published, served in place (the same bundle object: no reload)
    assert handle.retune.counts == {"applied": 1, "refused_recall": 0, "refused_latency": 0, "failed": 0}
    assert metric(handle.url, "towerann_retunes_total", outcome="applied") == 1.0
    assert metric(handle.url, "towerann_retunes_total", outcome="refused_latency") == 0.0
    new = current_version(root)
    assert new != old and holder.current() is served and served.version == new
    assert served.index.search_defaults["ef"] > TOO_LOW_EF and served.index.search_defaults["exact_below"] == 0
    m = read_checked_manifest(root / new)  # checksums verified: the same files, hard-linked
    assert m["retuned_from"] == old and m["search_defaults"] == served.index.search_defaults
    # the bundle keeps its own target (tuned with the margin's headroom): a re-tune does not raise the next one's
    assert m["tuning"]["target"] == served.index.tuning["target"] == TARGET and m["tuning"]["tuned_to"] > TARGET
    assert m["retune_reason"] == f"online recall {before['recall']:.3f} < {TARGET:g} over {JUDGED} samples"
    assert handle.service.reloader.check() is None  # CURRENT names what is served: nothing to reload
    applied = events(caplog, "retune_applied")
    assert len(applied) == 1 and applied[0].from_version == old and applied[0].to_version == new
    assert len(events(caplog, "retune_started")) == 1

    # a second wave at the new setting: the target is met online, and nothing is re-tuned again
    assert set(ask_all(handle, queries(catalog, JUDGED, seed=2))) == {new}
    after = online(handle, new)
    assert after["samples"] == JUDGED and after["recall"] >= TARGET, after
    assert sum(handle.retune.counts.values()) == 1 and len(events(caplog, "retune_started")) == 1
    assert metric(handle.url, "towerann_retunes_total", outcome="applied") == 1.0
    assert metric(handle.url, "towerann_recall_unrestorable") == 0.0
    ready = httpx.get(f"{handle.url}/readyz").json()
    assert ready["recall"]["retune"]["state"] == "watching" and ready["recall"]["retune"]["last"]["to_version"] == new

    # `index rollback` undoes it like any version
    assert main(["index", "rollback", "--root", str(root)]) == 0 and current_version(root) == old
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
    assert holder.current().version == old and holder.current().index.search_defaults["ef"] == TOO_LOW_EF


def test_a_retune_over_the_latency_budget_is_refused_and_the_old_settings_stay(
    catalog: dict[str, Any], tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="towerann.serving.retune_loop")
    root = tmp_path / "indexes"
    old = publish_poor(catalog, root).name
    handle = serve(config(catalog, tmp_path, root, max_p99_ms=1e-6))  # no search is that fast
    served = handle.retriever.holder.current()

    ask_all(handle, queries(catalog, JUDGED, seed=1))
    assert handle.retune.counts == {"applied": 0, "refused_recall": 0, "refused_latency": 1, "failed": 0}
    assert metric(handle.url, "towerann_retunes_total", outcome="refused_latency") == 1.0
    assert metric(handle.url, "towerann_retunes_total", outcome="applied") == 0.0
    assert current_version(root) == old and served.version == old and handle.retriever.holder.current() is served
    assert served.index.search_defaults["ef"] == TOO_LOW_EF  # the old setting serves on
    assert handle.retune.last["heldout_recall"] >= TARGET  # it was the latency that refused it
    refused = events(caplog, "retune_refused")
    assert len(refused) == 1 and refused[0].outcome == "refused_latency" and "max_p99_ms" in refused[0].getMessage()
    assert metric(handle.url, "towerann_recall_unrestorable") == 1.0
    retune = httpx.get(f"{handle.url}/readyz").json()["recall"]["retune"]
    assert retune["state"] == "unrestorable" and "p99" in retune["why"]
    unrestorable = events(caplog, "recall_unrestorable")
    assert len(unrestorable) == 1 and "towerann refresh" in unrestorable[0].getMessage()  # no rebuild here

    ask_all(handle, queries(catalog, JUDGED, seed=2))  # still below target, but within [retune] cooldown_s
    assert sum(handle.retune.counts.values()) == 1 and len(events(caplog, "retune_started")) == 1


def test_a_graph_that_cannot_reach_the_target_is_refused_on_recall(
    catalog: dict[str, Any], tmp_path: Path, serve: Any
) -> None:
    root = tmp_path / "indexes"
    old = publish_poor(catalog, root, M=4, ef=None).name  # tuned to 0.95, never reached: a rebuild's job
    cfg = config(catalog, tmp_path, root)
    handle = serve(dataclasses.replace(cfg, freshness=dataclasses.replace(cfg.freshness, rebuild_on_drift=True)))
    before = dict(handle.retriever.holder.current().index.search_defaults)

    ask_all(handle, queries(catalog, JUDGED, seed=1))
    assert handle.retune.counts["refused_recall"] == 1 and sum(handle.retune.counts.values()) == 1
    assert handle.retune.last["heldout_recall"] < TARGET
    assert current_version(root) == old and handle.retriever.holder.current().index.search_defaults == before
    assert metric(handle.url, "towerann_recall_unrestorable") == 1.0
    assert handle.retune.rebuild is None  # rebuild_on_drift, but no dataset to rebuild from: reported only
    assert httpx.get(f"{handle.url}/readyz").json()["recall"]["retune"]["state"] == "unrestorable"


def test_index_tune_from_live_uses_the_reservoir_and_says_why_not_in_one_line(
    catalog: dict[str, Any], tmp_path: Path, fixed_tuner_costs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "indexes"
    old = publish_poor(catalog, root).name
    model = read_checked_manifest(root / old)["model_version"]

    r = subprocess.run(
        [sys.executable, "-m", "towerann.cli", "index", "tune", str(root), "--from-live", "--k", str(K)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no live queries" in r.stderr

    reservoir = LiveQueries(2000, root=root)  # what a server serving the root writes
    for q in queries(catalog, 40, seed=3):
        reservoir.offer(model, q, K, None)
    reservoir.save()
    assert main(["index", "tune", str(root), "--from-live", "--k", str(K)]) == 2
    assert "40 live queries" in capsys.readouterr().err and current_version(root) == old

    for q in queries(catalog, 260, seed=4):
        reservoir.offer(model, q, K, {"categories": ["c1"]})  # filters are kept, and tuning ignores them
    reservoir.save()
    assert len(read_live_queries(root, model)) == 300
    assert main(["index", "tune", str(root), "--from-live", "--k", str(K)]) == 0  # --recall: the tuned target
    assert "300 live queries" in capsys.readouterr().out
    new = current_version(root)
    m = read_checked_manifest(root / new)
    assert new != old and m["retuned_from"] == old and m["retune_reason"] == "live queries: 300 from main"
    assert m["tuning"]["target"] == TARGET and m["search_defaults"]["ef"] > TOO_LOW_EF
    fresh = queries(catalog, 200, seed=5)
    index = load_snapshot(root)
    assert recall_at_k(index.search(fresh, K).ids, index.exact_search(fresh, K).ids) >= TARGET
    assert main(["index", "info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["retuned_from"] == old and info["retune_reason"] == "live queries: 300 from main"

"""The online recall monitor (serving.monitor): its recall is the offline recall of the same requests,
a full queue drops and counts, a swapped-out bundle is never searched, the threshold marks a bundle."""

from __future__ import annotations

import gc
import logging
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from towerann.config import load_config
from towerann.errors import ConfigError
from towerann.features import open_store
from towerann.freshness.publish import publish_bundle
from towerann.index import Filter
from towerann.index.tune import recall_at_k
from towerann.serving.app import Metrics
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.monitor import MIN_SAMPLES, RecallMonitor, filter_kind, recall_of
from towerann.serving.retriever import Retriever


@pytest.fixture(scope="module")
def poor(serving_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> RetrievalBundle:
    """An HNSW bundle made to miss: a sparse graph, ef = k, every masked search through the library."""
    import faiss

    root = tmp_path_factory.mktemp("poor-hnsw")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a parallel insert gives another graph (and recall) from run to run
    try:
        publish_bundle(
            root,
            serving_bundle["model"],
            serving_bundle["vectors"],
            kind="hnsw",
            params={"M": 4, "ef_construction": 8, "ef": 1, "exact_below": 0},
        )
    finally:
        faiss.omp_set_num_threads(before)
    return RetrievalBundle.load(root)


def queries(b: RetrievalBundle, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, b.index.dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def metric_value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_monitor_recall_equals_the_offline_recall_of_the_same_requests(poor: RetrievalBundle) -> None:
    holder = BundleHolder(poor)
    monitor = RecallMonitor(holder, sample=1.0, threshold=0.0, queue_size=1000)
    metrics = Metrics()
    metrics.watch(monitor)
    retriever = Retriever(holder, open_store("memory"), monitor=monitor)
    try:
        q, k = queries(poor, 60), 10
        category = "cat_0004"  # one of the synthetic catalog's categories
        for row in q[:40]:
            retriever.candidates(None, k, query_vector=row.tolist())
        for row in q[40:]:
            retriever.candidates(None, k, {"categories": [category]}, query_vector=row.tolist())
        assert monitor.drain()
        flt = Filter(categories={poor.category_code[category]})
        offline = {
            "none": recall_at_k(poor.index.search(q[:40], k).ids, poor.index.exact_search(q[:40], k).ids),
            "category": recall_at_k(
                poor.index.search(q[40:], k, filter=flt).ids, poor.index.exact_search(q[40:], k, filter=flt).ids
            ),
        }
        got = monitor.snapshot()["bundles"][poor.version]
        assert {kind: got[kind]["samples"] for kind in got} == {"none": 40, "category": 20}
        for kind, want in offline.items():
            assert want < 0.99, (kind, want)  # the degraded index really misses: a recall of 1.0 proves nothing
            assert got[kind]["recall"] == pytest.approx(want, abs=1e-4), kind
            assert metric_value(metrics, "towerann_recall", bundle=poor.version, filter=kind) == pytest.approx(want)
            assert (
                metric_value(metrics, "towerann_recall_sample_count", bundle=poor.version, filter=kind)
                == got[kind]["samples"]
            )
    finally:
        retriever.close()
        retriever.store.close()
    assert monitor._thread is None  # the retriever stopped its monitor


def test_a_full_queue_drops_and_counts_and_sample_zero_queues_nothing(poor: RetrievalBundle) -> None:
    holder = BundleHolder(poor)
    monitor = RecallMonitor(holder, sample=1.0, queue_size=2, start=False)  # nobody takes from the queue
    metrics = Metrics()
    metrics.watch(monitor)
    q = queries(poor, 1)[0]
    ids = poor.index.search(q[None, :], 5).ids[0]
    for _ in range(5):
        monitor.offer(poor, q, 5, None, ids)
    snap = monitor.snapshot()
    assert (snap["queued"], snap["dropped"]["queue_full"]) == (2, 3)
    assert metric_value(metrics, "towerann_recall_samples_dropped_total", reason="queue_full") == 3
    off = RecallMonitor(holder, sample=0.0, start=False)
    for _ in range(50):
        off.offer(poor, q, 5, None, ids)
    assert off.snapshot()["queued"] == 0 and off._thread is None


def test_a_queued_sample_holds_no_bundle_and_a_swapped_out_bundle_is_not_searched(
    serving_bundle: dict[str, Path], poor: RetrievalBundle
) -> None:
    other = RetrievalBundle.load(serving_bundle["index"])
    holder = BundleHolder(other)
    monitor = RecallMonitor(holder, sample=1.0, start=False)
    q = queries(other, 1)[0]
    ids = other.index.search(q[None, :], 5).ids[0]
    refs = sys.getrefcount(other)
    monitor.offer(other, q, 5, None, ids)
    assert sys.getrefcount(other) == refs  # queued by weak reference: the reloader's release is not held up
    ref, *rest = monitor._queue.get_nowait()
    holder.swap(poor)
    assert monitor.process(ref, *rest) is None and monitor.dropped["stale"] == 1
    assert monitor.snapshot()["bundles"] == {}
    holder.swap(other)
    assert monitor.process(ref, *rest) == 1.0  # served again: scored (exact index: exact answers)
    holder.swap(poor)
    del other
    gc.collect()
    assert ref() is None  # nothing of the monitor's kept it alive
    assert monitor.process(ref, *rest) is None and monitor.dropped["stale"] == 2


def test_threshold_marks_the_bundle_and_logs_once(poor: RetrievalBundle, caplog: pytest.LogCaptureFixture) -> None:
    holder = BundleHolder(poor)
    monitor = RecallMonitor(holder, sample=1.0, threshold=0.99, start=False)
    q, k = queries(poor, MIN_SAMPLES + 5, seed=3), 10
    ref = weakref.ref(poor)
    with caplog.at_level(logging.WARNING, logger="towerann.serving.monitor"):
        for i, row in enumerate(q):
            monitor.process(ref, row, k, None, poor.index.search(row[None, :], k).ids[0])
            if i == MIN_SAMPLES - 2:  # too few samples to judge yet
                assert monitor.health(poor.version)["healthy"]
    health = monitor.health(poor.version)
    assert not health["healthy"] and set(health["below"]) == {"none"} and health["samples"] == len(q)
    assert health["below"]["none"] < 0.99
    warnings = [r for r in caplog.records if "under the threshold" in r.getMessage()]
    assert len(warnings) == 1 and poor.version in warnings[0].getMessage()
    assert monitor.health("another-version") == {"healthy": True, "threshold": 0.99, "samples": 0, "below": {}}


def test_recall_of_and_filter_kinds() -> None:
    assert recall_of(np.array([1, 2, 3, -1]), np.array([3, 2, 9, 8])) == 0.5
    assert recall_of(np.array([1, -1]), np.array([-1, -1])) is None  # nothing qualified: no sample
    assert filter_kind(None) == filter_kind(Filter()) == "none"
    assert filter_kind(Filter(categories={1})) == "category"
    assert (
        filter_kind(Filter(attributes={"brand": {0}}))
        == filter_kind(Filter(categories={1}, attributes={"brand": {0}}))
        == "attribute"
    )


def test_monitor_config(tmp_path: Path) -> None:
    assert load_config().monitor.sample == 0.01  # on by default, at 1%
    path = tmp_path / "t.toml"
    path.write_text("[monitor]\nsample = 0.5\nthreshold = 0.8\nqueue = 8\n")
    m = load_config(path).monitor
    assert (m.sample, m.threshold, m.queue) == (0.5, 0.8, 8)
    for bad in ("sample = 1.5", "threshold = -0.1", "queue = 0", "max_busy = 0", "max_busy = 2"):
        path.write_text(f"[monitor]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"\[monitor\]"):
            load_config(path)


def test_after_a_sample_the_monitor_rests_for_its_duty_cycle(poor: RetrievalBundle) -> None:
    """max_busy bounds the monitor's share of time: after a sample that took t s, offers for the next
    t / max_busy - t s are dropped as "busy" (an exact search over 10M items takes ~0.2 s)."""
    holder = BundleHolder(poor)
    monitor = RecallMonitor(holder, sample=1.0, threshold=0.0, queue_size=100, max_busy=1e-6)
    try:
        q = queries(poor, 10)
        ids = poor.index.search(q, 5).ids
        monitor.offer(poor, q[0], 5, None, ids[0])
        assert monitor.drain()
        for row, found in zip(q[1:], ids[1:]):
            monitor.offer(poor, row, 5, None, found)
        assert monitor.drain()
        snap = monitor.snapshot()
        assert snap["dropped"]["busy"] == 9 and snap["bundles"][poor.version]["none"]["samples"] == 1
    finally:
        monitor.close()
    eager = RecallMonitor(holder, sample=1.0, threshold=0.0, queue_size=100)  # max_busy 1: never rests
    try:
        for row, found in zip(q, ids):
            eager.offer(poor, row, 5, None, found)
            assert eager.drain()
        assert eager.dropped["busy"] == 0 and eager.snapshot()["bundles"][poor.version]["none"]["samples"] == 10
    finally:
        eager.close()

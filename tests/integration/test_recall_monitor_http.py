"""The online recall monitor over real HTTP on loopback: a bundle whose index is deliberately degraded
(IVF-PQ searching 1 list, every masked search through faiss) shows a low recall in /v1/admin/recall and
/metrics, and is marked unhealthy in /readyz details while readiness stays 200."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import ann_catalog
import httpx
import pytest
from ann_catalog import AUTH, build_library_index, server_config

from towerann.config import MonitorConfig
from towerann.freshness.publish import publish_bundle
from towerann.server.server import ServerHandle, start_background

THRESHOLD = 0.9


@pytest.fixture
def degraded(
    tmp_path: Path, bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    cat = ann_catalog.catalog(tmp_path_factory.getbasetemp(), bundle_paths)
    root = tmp_path / "indexes"
    publish_bundle(root, cat["model"], cat["vectors"], index=build_library_index(cat, "ivfpq", nprobe=1))
    cfg = dataclasses.replace(
        server_config(tmp_path, root, cat),
        monitor=MonitorConfig(sample=1.0, threshold=THRESHOLD, queue=256, max_busy=1.0),
    )
    handle = start_background(cfg)
    yield handle
    handle.stop()


def test_a_degraded_bundle_shows_low_recall_and_is_marked_in_readyz(
    degraded: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    url, monitor = degraded.url, degraded.retriever.monitor
    b = degraded.retriever.holder.current()
    assert "IVF" in b.index.describe() and b.index.search_defaults["nprobe"] == 1
    n, k = 40, 10  # k under a list's ~40 items: a row the library leaves short of k would go exact
    with caplog.at_level(logging.WARNING, logger="towerann.serving.monitor"):
        answered = []
        for user in range(n):
            r = httpx.post(f"{url}/v1/candidates", json={"user_id": str(user), "k": k})
            assert r.status_code == 200, r.text
            answered.append([c["item_id"] for c in r.json()["candidates"]])
        assert monitor.drain()

    got = httpx.get(f"{url}/v1/admin/recall", headers=AUTH)
    assert got.status_code == 200, got.text
    report = got.json()
    assert report["served"] == b.version and report["sample"] == 1.0 and report["threshold"] == THRESHOLD
    none = report["bundles"][b.version]["none"]
    assert none["samples"] == n and not none["healthy"]
    # The same requests scored here, from their HTTP answers: the monitor's recall is theirs.
    truth = [
        b.external_ids[row[row >= 0]].tolist()
        for row in (b.index.exact_search(b.encoder.encode(str(u), {}, [])[None, :], k).ids[0] for u in range(n))
    ]
    offline = sum(len(set(a) & set(t)) for a, t in zip(answered, truth)) / sum(len(t) for t in truth)
    assert none["recall"] == pytest.approx(offline, abs=0.01) and offline < THRESHOLD

    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200  # a poor bundle still serves: readiness is not failed
    health = ready.json()["recall"]
    assert health["healthy"] is False and health["below"]["none"] < THRESHOLD and health["samples"] == n
    assert sum("under the threshold" in r.getMessage() and b.version in r.getMessage() for r in caplog.records) == 1

    text = httpx.get(f"{url}/metrics").text
    gauge = [
        line
        for line in text.splitlines()
        if line.startswith("towerann_recall{") and f'bundle="{b.version}"' in line and 'filter="none"' in line
    ]
    assert len(gauge) == 1 and float(gauge[0].rsplit(" ", 1)[1]) == pytest.approx(none["recall"], abs=1e-4)
    assert f'towerann_recall_sample_count{{bundle="{b.version}",filter="none"}} {float(n)}' in text

    assert httpx.get(f"{url}/v1/admin/recall").status_code == 401  # the admin routes' bearer token
    assert httpx.get(f"{url}/v1/admin/recall", headers={"Authorization": "Bearer wrong"}).status_code == 401

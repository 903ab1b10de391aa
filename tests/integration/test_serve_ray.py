"""`towerann serve --ray ADDRESS` on a real local Ray cluster of two nodes (`ray start --head`, then a
node started with `--address`, as on two machines): the bundle's model and id map in the server
process, the index on one shard actor per shard. Real HTTP to a real server subprocess; a shard
worker killed with SIGKILL: 200 answers that say `partial` and name the shard, then back by itself,
with the write the front made on it replayed. Hot swap is refused with a 409. Every shard killed: 503
naming them all, then back; one log line per shard leaving and per shard coming back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from ann_catalog import AUTH, TOKEN
from ray_cluster import two_nodes

from towerann.client import Client
from towerann.data.vectors_dir import read_vectors
from towerann.freshness.publish import publish_bundle
from towerann.index.shard_hash import shard_of
from towerann.server.server import start_subprocess
from towerann.serving.bundle import RetrievalBundle

S, K = 2, 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, str]]:
    """Two local Ray nodes; this process joins as a driver in the shards' namespace, to find their processes."""
    yield from two_nodes("towerann")


def search(url: str, query: np.ndarray) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/candidates", json={"query_vector": query.tolist(), "k": K}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(body: dict[str, Any]) -> list[Any]:
    return [c["item_id"] for c in body["candidates"]]


def test_serve_ray_answers_partial_while_a_shard_is_down_then_recovers(cluster, bundle_paths, tmp_path) -> None:
    ray, address = cluster
    root = tmp_path / "indexes"
    publish_bundle(
        root, bundle_paths["model"], bundle_paths["vectors"], kind="sharded", params={"shards": S, "backend": "exact"}
    )
    local = RetrievalBundle.load(root)  # the same bundle with its shards in this process: the expected answers
    queries = read_vectors(bundle_paths["vectors"]).vectors[:3]

    def expected(q: np.ndarray) -> list[Any]:
        ids = local.index.search(q[None, :], K).ids[0]
        return local.external_ids[ids[ids >= 0]].tolist()

    server_log = tmp_path / "server.log"
    handle = start_subprocess(
        root, "memory", env={"TOWERANN_API_TOKEN": TOKEN}, args=["--ray", address], timeout_s=180, log_file=server_log
    )
    try:
        url = handle.url
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["index"] == f"sharded({S} x exact)" and ready["items"] == len(local.index)
        assert ready["dependencies"]["shards"] == "up" and "missing_shards" not in ready
        for q in queries:
            body = search(url, q)
            assert ids_of(body) == expected(q) and "partial" not in body

        # a write through the front onto the shard that is about to die: its snapshot still shows the item
        hidden = ids_of(search(url, queries[0]))[0]
        assert httpx.patch(f"{url}/v1/items/{hidden}", json={"available": False}, headers=AUTH).status_code == 200
        local.set_available(str(hidden), False)
        victim = int(shard_of([local.item_internal.get(str(hidden))], S)[0])
        assert hidden not in ids_of(search(url, queries[0]))

        pid = ray.get(ray.get_actor(f"towerann-shard-{victim}").info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        partial, body = None, None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = search(url, queries[0])
            if body.get("partial"):
                if partial is None:  # at once, while the worker restarts (a new process: seconds)
                    ready = httpx.get(f"{url}/readyz", timeout=30)
                    assert ready.status_code == 200, ready.text  # still serving, partially
                    assert ready.json()["dependencies"]["shards"] == "partial" and ready.json()["degraded"]
                    assert ready.json()["missing_shards"] == [victim] and ready.json()["items"] is None
                    got = Client(url, timeout_s=30).candidates("some-user", k=K)  # the client says so too
                    assert got.partial and got.missing_shards == [victim]
                partial = body
            elif partial is not None:
                break
            time.sleep(0.2)
        assert partial is not None, "no answer said partial while the shard was down"
        assert partial["missing_shards"] == [victim]
        left = [local.item_internal.get(str(i)) for i in ids_of(partial)]
        assert len(left) == K and (shard_of(left, S) != victim).all()  # the other shard's best, a full k
        assert body is not None and "partial" not in body, "the shard did not come back within 60 s"
        assert ids_of(body) == expected(queries[0]) and hidden not in ids_of(body)  # its write was replayed
        assert httpx.get(f"{url}/readyz").json()["dependencies"]["shards"] == "up"
        new_pid = ray.get(ray.get_actor(f"towerann-shard-{victim}").info.remote())["pid"]
        assert new_pid != pid

        metrics = httpx.get(f"{url}/metrics").text
        count = [line for line in metrics.splitlines() if line.startswith("towerann_partial_answers_total")]
        assert count and float(count[0].split()[-1]) >= 1

        r = httpx.post(f"{url}/v1/admin/reload", headers=AUTH)
        assert r.status_code == 409 and "Ray" in r.json()["error"]
        assert httpx.get(f"{url}/readyz").json()["index_version"] == root.joinpath("CURRENT").read_text().strip()

        # Every shard down: nothing to merge, so a 503 naming them (it was an empty 200, "degraded": false).
        for s in range(S):
            os.kill(ray.get(ray.get_actor(f"towerann-shard-{s}").info.remote())["pid"], signal.SIGKILL)
        down = None
        deadline = time.monotonic() + 60
        while down is None and time.monotonic() < deadline:
            r = httpx.post(f"{url}/v1/candidates", json={"query_vector": queries[0].tolist(), "k": K}, timeout=30)
            if r.status_code == 503:
                down = r.json()
            else:
                assert r.status_code == 200, r.text
                time.sleep(0.1)
        assert down is not None and down["missing_shards"] == list(range(S)) and "error" in down, down
        # back by themselves: Ray may take tens of seconds to report a killed actor (a late answer is not a
        # failure), then restarts it; on a busy machine that exceeded a minute once
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            r = httpx.post(f"{url}/v1/candidates", json={"query_vector": queries[0].tolist(), "k": K}, timeout=30)
            if r.status_code == 200 and "partial" not in r.json():
                break
            time.sleep(0.2)
        assert r.status_code == 200 and ids_of(r.json()) == expected(queries[0]), r.text
    finally:
        handle.stop()
    # One log line per shard leaving and per shard coming back: for each shard they alternate, and
    # every outage (the victim's, then both) ended with the shard back.
    lines = server_log.read_text().splitlines()
    for s in range(S):
        events = [
            ("down" if "did not answer" in line else "up")
            for line in lines
            if f"shard {s} of " in line and ("did not answer" in line or "answers again" in line)
        ]
        assert events and events == ["down", "up"] * (len(events) // 2), (s, events)
        assert len(events) >= (4 if s == victim else 2), (s, events)

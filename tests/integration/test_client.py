"""towerann.client.Client against a real server on loopback: same answers as raw HTTP, writes that take
effect, the Python API's errors with the server's message, retries on 503 counted by the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ann_catalog import TOKEN, server_config

from towerann.client import Client
from towerann.config import FeaturesConfig
from towerann.data.dataset import read_items
from towerann.data.vectors_dir import read_vectors
from towerann.errors import BackendUnavailable, BadRequest, NotFound, Unauthorized
from towerann.freshness.publish import publish_bundle
from towerann.server.server import ServerHandle, free_port, start_background


@pytest.fixture
def served(tmp_path: Path, bundle_paths: dict[str, Path]) -> Iterator[ServerHandle]:
    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    handle = start_background(server_config(tmp_path, root, bundle_paths))
    yield handle
    handle.stop()


def wait_for_ping(url: str, timeout_s: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with redis.Redis.from_url(url, socket_timeout=0.2) as r:
                if r.ping():
                    return
        except redis.RedisError:
            assert time.monotonic() < deadline, f"{url} did not answer PING"
            time.sleep(0.05)


def item_like(bundle_paths: dict[str, Path], item_id: str, category: str) -> dict[str, Any]:
    row = read_items(bundle_paths["data"]).iloc[3]
    return {
        **{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()},
        "item_id": item_id,
        "category": category,
        "available": True,
    }


def test_the_client_answers_as_raw_http_and_its_writes_take_effect(served: ServerHandle, bundle_paths) -> None:
    raw = httpx.post(f"{served.url}/v1/candidates", json={"user_id": "7", "k": 20}).json()
    with Client(served.url, token=TOKEN) as c:
        got = c.candidates("7", k=20)
        assert got.item_ids == [x["item_id"] for x in raw["candidates"]] and isinstance(got.item_ids[0], int)
        assert got.scores == pytest.approx([x["score"] for x in raw["candidates"]])
        assert (got.model_version, got.index_version, got.degraded) == (
            raw["model_version"],
            raw["index_version"],
            False,
        )

        cats = dict(zip(read_items(bundle_paths["data"])["item_id"], read_items(bundle_paths["data"])["category"]))
        least = min(set(cats.values()), key=lambda cat: sum(cats[i] == cat for i in got.item_ids))
        for item in [i for i, cat in cats.items() if cat == least][:5]:
            assert c.event("7", item)["user_id"] == "7"
        after = c.candidates("7", k=20)
        assert sum(cats[i] == least for i in after.item_ids) > sum(cats[i] == least for i in got.item_ids)

        assert c.upsert_items([item_like(bundle_paths, "955001", "client_cat")])["upserted"] == 1
        assert c.candidates("7", k=5, categories=["client_cat"]).item_ids == [955001]
        assert c.set_available("955001", False)["available"] is False
        assert c.candidates("7", k=5, categories=["client_cat"]).item_ids == []
        assert c.delete_item("955001")["deleted"] is True
        assert c.ready()["index_version"] == got.index_version


def test_errors_are_the_python_apis_with_the_servers_message_and_no_token(served: ServerHandle) -> None:
    with Client(served.url, token=TOKEN) as c:
        with pytest.raises(BadRequest, match="k must be"):
            c.candidates("7", k=0)
        with pytest.raises(NotFound, match="955999"):
            c.set_available("955999", True)
    with Client(served.url, token="wrong-secret-77") as c, pytest.raises(Unauthorized) as e:
        c.upsert_items([{"item_id": "1"}])
    assert "wrong-secret-77" not in str(e.value)


def test_503_is_retried_with_backoff_then_raised_and_the_server_saw_each_try(
    tmp_path: Path, bundle_paths, spawn_redis
) -> None:
    port = free_port()
    redis = spawn_redis(port, "--appendonly", "yes")
    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    cfg = server_config(tmp_path, root, bundle_paths)
    cfg = type(cfg)(
        serve=cfg.serve,
        paths=cfg.paths,
        freshness=cfg.freshness,
        features=FeaturesConfig(store=f"redis://127.0.0.1:{port}/0", retry_s=0.0, timeout_ms=200, write_timeout_ms=200),
    )
    wait_for_ping(f"redis://127.0.0.1:{port}/0")
    handle = start_background(cfg)
    try:
        redis.kill()
        redis.wait()
        with Client(handle.url, retries=2, backoff_s=0.01) as c:
            with pytest.raises(BackendUnavailable, match="503"):
                c.event("7", "12")
            assert c.candidates("7", k=5).degraded is True  # reads degrade instead
        metrics = httpx.get(f"{handle.url}/metrics").text
        tries = [
            line
            for line in metrics.splitlines()
            if line.startswith("towerann_http_requests_total") and '"/v1/events"' in line and '"503"' in line
        ]
        assert tries and float(tries[0].rsplit(" ", 1)[1]) == 3.0, tries  # 1 try + 2 retries
    finally:
        handle.stop()


def test_an_unreachable_server_is_backend_unavailable_without_the_urls_credentials() -> None:
    url = f"http://admin:pw-never-shown@127.0.0.1:{free_port()}"
    with Client(url, retries=1, backoff_s=0.0) as c, pytest.raises(BackendUnavailable, match="cannot connect") as e:
        c.candidates("7")
    assert "pw-never-shown" not in str(e.value)


def test_filters_on_categories_and_attributes_as_raw_http_does(tmp_path: Path, bundle_paths) -> None:
    vs = read_vectors(bundle_paths["vectors"])
    labels = ["acme", "globex", "initech"]
    label = (np.arange(len(vs.external_ids)) % 3).astype(np.int32)
    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], vs, kind="exact", attributes={"label": (label, labels)})
    items = read_items(bundle_paths["data"])
    available = dict(zip(items["item_id"], items["available"]))
    category = dict(zip(items["item_id"], items["category"]))
    cat = items["category"].value_counts().index[0]
    want = {i for i, code in zip(vs.external_ids.tolist(), label) if available[i] and category[i] == cat and code != 1}
    handle = start_background(server_config(tmp_path, root, bundle_paths))
    try:
        flt = {"categories": [cat], "label": ["acme", "initech"]}
        raw = httpx.post(f"{handle.url}/v1/candidates", json={"user_id": "7", "k": 1000, "filter": flt}).json()
        with Client(handle.url) as c:
            got = c.candidates("7", k=1000, filter=flt)
            assert 0 < len(want) < 1000 and set(got.item_ids) == want
            assert got.item_ids == [x["item_id"] for x in raw["candidates"]]
            # categories= is short for filter={"categories": ...}; any sequence of values will do
            short = c.candidates("7", k=1000, categories=[cat], filter={"label": ("acme", "initech")})
            assert short.item_ids == got.item_ids
            assert set(c.candidates("7", k=1000, categories=[cat]).item_ids) >= want
            assert set(c.candidates("7", k=1000, filter={"label": ["globex"]}).item_ids).isdisjoint(want)
            with pytest.raises(BadRequest, match="colour"):  # a key the bundle does not filter on: the server says so
                c.candidates("7", k=5, filter={"colour": ["red"]})
            with pytest.raises(BadRequest, match="categories given twice"):  # refused before any request
                c.candidates("7", k=5, categories=[cat], filter={"categories": [cat]})
    finally:
        handle.stop()

"""Freshness over real HTTP and real files: item writes at once, hot swap of whole bundles, nothing lost."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pandas as pd
import pytest

from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.data.dataset import read_interactions, read_items
from towerann.freshness.deltalog import open_delta_log
from towerann.freshness.refresh import refresh
from towerann.index.snapshot import current_version, set_current
from towerann.serving.bundle import publish_bundle
from towerann.service.server import ServerHandle, start_background, start_subprocess

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def items(bundle_paths: dict[str, Path]) -> pd.DataFrame:
    frame = read_items(bundle_paths["data"])
    counts = read_interactions(bundle_paths["data"])["item_id"].value_counts()
    return frame.assign(pop=frame["item_id"].map(counts).fillna(0)).sort_values("pop", ascending=False)


def make_root(tmp_path: Path, bundle_paths: dict[str, Path], token: bool = True, poll_s: float = 0.0) -> Config:
    """A bundle root of its own (the shared fixture's vectors, exact index) and a config serving it."""
    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    token_file = ""
    if token:
        (tmp_path / "token").write_text(TOKEN + "\n")
        token_file = str(tmp_path / "token")
    return Config(serve=ServeConfig(max_k=1000, max_body_bytes=1 << 20),
                  paths=PathsConfig(index=str(root), model=str(bundle_paths["model"]), data=str(bundle_paths["data"])),
                  features=FeaturesConfig(store="embedded", path=str(tmp_path / "features.sqlite")),
                  freshness=FreshnessConfig(delta_path=str(tmp_path / "delta.sqlite"), token_file=token_file,
                                            poll_s=poll_s, min_recall=0.8))


@pytest.fixture
def server(tmp_path: Path, bundle_paths: dict[str, Path]) -> Iterator[tuple[ServerHandle, Config]]:
    cfg = make_root(tmp_path, bundle_paths)
    handle = start_background(cfg)
    yield handle, cfg
    handle.stop()


def new_item(items: pd.DataFrame, category: str, item_id: str, template_rank: int = 0) -> dict[str, Any]:
    """A new item with the features of one of the category's popular items (a near neighbour of them)."""
    row = items[(items["category"] == category) & items["available"]].iloc[template_rank]
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.drop(["pop"]).items()}
    return {**out, "item_id": item_id, "available": True}


def candidate_ids(url: str, user: str, k: int, categories: list[str] | None = None) -> list[Any]:
    body: dict[str, Any] = {"user_id": user, "k": k}
    if categories:
        body["filter"] = {"categories": categories}
    r = httpx.post(f"{url}/v1/candidates", json=body)
    assert r.status_code == 200, r.text
    return [c["item_id"] for c in r.json()["candidates"]]


# ---- auth ---------------------------------------------------------------------------------------

def test_writes_need_the_token(server, items) -> None:
    handle, _ = server
    body = {"items": [new_item(items, "cat_0001", "900001")]}
    assert httpx.post(f"{handle.url}/v1/items", json=body).status_code == 401
    wrong = httpx.post(f"{handle.url}/v1/items", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    assert httpx.patch(f"{handle.url}/v1/items/1", json={"available": False}).status_code == 401
    assert httpx.delete(f"{handle.url}/v1/items/1").status_code == 401
    assert httpx.post(f"{handle.url}/v1/admin/reload").status_code == 401
    # The token is checked before the body: a bad body without it learns nothing about the schema.
    assert httpx.post(f"{handle.url}/v1/items", json={"items": "x"}).status_code == 401
    assert httpx.patch(f"{handle.url}/v1/items/1", json={"available": "no"}).status_code == 401
    assert httpx.post(f"{handle.url}/v1/items", json=body, headers=AUTH).status_code == 200
    # Reads need no token.
    assert httpx.post(f"{handle.url}/v1/candidates", json={"user_id": "1", "k": 3}).status_code == 200


def test_no_token_configured_means_writes_are_refused(tmp_path: Path, bundle_paths, items, monkeypatch) -> None:
    monkeypatch.delenv("TOWERANN_API_TOKEN", raising=False)
    handle = start_background(make_root(tmp_path, bundle_paths, token=False))
    try:
        r = httpx.post(f"{handle.url}/v1/items", json={"items": [new_item(items, "cat_0001", "900001")]}, headers=AUTH)
        assert r.status_code == 403 and "no API token" in r.json()["error"]
    finally:
        handle.stop()


def test_bad_item_writes_get_clear_4xx(server, items) -> None:
    handle, _ = server
    good = new_item(items, "cat_0001", "900002")
    for body, status, words in [
        ({"items": []}, 422, "items"),
        ({"items": [{**good, "price": "cheap"}]}, 400, "price"),
        ({"items": [{**good, "colour": "red"}]}, 400, "unknown fields"),
        ({"items": [{**good, "item_id": "abc"}]}, 400, "integers"),
        ({"items": [good, good]}, 400, "twice"),
    ]:
        r = httpx.post(f"{handle.url}/v1/items", json=body, headers=AUTH)
        assert r.status_code == status and words in r.json()["error"], (body, r.text)
    r = httpx.patch(f"{handle.url}/v1/items/no-such", json={"available": False}, headers=AUTH)
    assert r.status_code == 404
    r = httpx.patch(f"{handle.url}/v1/items/1", json={"available": "no"}, headers=AUTH)
    assert r.status_code == 422


# ---- items at once ------------------------------------------------------------------------------

def test_new_item_is_returned_by_the_next_request_for_a_user_who_clicked_its_neighbours(server, items) -> None:
    handle, _ = server
    for user, category in (("fan", "cat_0005"), ("other", "cat_0001")):
        for item in items[(items["category"] == category) & items["available"]]["item_id"].head(8):
            r = httpx.post(f"{handle.url}/v1/events", json={"user_id": user, "item_id": str(item)})
            assert r.status_code == 200
    r = httpx.post(f"{handle.url}/v1/items", json={"items": [new_item(items, "cat_0005", "990001")]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["upserted"] == 1
    # k=50 of 2000: the new item (embedded from its content: an unknown id) ranks near the clicked items
    # for the user who clicked them, and nowhere near for a user who clicked another category.
    assert 990001 in candidate_ids(handle.url, "fan", 50)
    assert 990001 not in candidate_ids(handle.url, "other", 50)
    # ...and it can be clicked like any catalog item.
    assert httpx.post(f"{handle.url}/v1/events", json={"user_id": "fan", "item_id": "990001"}).status_code == 200


def test_unavailable_and_deleted_items_are_never_returned(server, items) -> None:
    handle, _ = server
    users = [str(u) for u in range(40)]
    top = {u: candidate_ids(handle.url, u, 10) for u in users}
    hidden = sorted({i for ids in top.values() for i in ids[:2]})
    deleted = top[users[0]][2]
    for item in hidden:
        assert httpx.patch(f"{handle.url}/v1/items/{item}", json={"available": False}, headers=AUTH).status_code == 200
    assert httpx.delete(f"{handle.url}/v1/items/{deleted}", headers=AUTH).status_code == 200
    gone = set(hidden) | {deleted}
    for u in users + [f"other-{i}" for i in range(20)]:
        assert not gone & set(candidate_ids(handle.url, u, 200)), u
    # Available again: the user's former top item comes back.
    back = top[users[0]][0]
    assert httpx.patch(f"{handle.url}/v1/items/{back}", json={"available": True}, headers=AUTH).status_code == 200
    assert back in candidate_ids(handle.url, users[0], 10)
    assert deleted not in candidate_ids(handle.url, users[0], 200)


# ---- hot swap -----------------------------------------------------------------------------------

class Load:
    """Steady requests from a few threads: every status and (model, index) version pair is recorded."""

    def __init__(self, url: str, threads: int = 3):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, t: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            i = t
            while not self.stop.is_set():
                r = http.post("/v1/candidates", json={"user_id": str(i % 50), "k": 20})
                body = r.json()
                self.results.append((r.status_code, body.get("model_version"), body.get("index_version")))
                i += len(self.threads)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def second_model(bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another training run of the towers (other seed): a new model version to ship."""
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("model2") / "model"
    train(bundle_paths["data"], out, TowerConfig(dim=32), TrainConfig(epochs=1, seed=7), name="second", progress=False)
    return out


def test_refresh_with_a_new_model_swaps_model_and_index_together_under_load(server, items, second_model) -> None:
    handle, cfg = server
    old_pair = (handle.retriever.holder.current().model_version, handle.retriever.holder.current().version)
    before = {"items": [new_item(items, "cat_0002", "910001")]}
    assert httpx.post(f"{handle.url}/v1/items", json=before, headers=AUTH).status_code == 200
    delta = open_delta_log("embedded", cfg.freshness.delta_path)
    published: dict[str, Any] = {}
    written: list[int] = []
    with Load(handle.url) as load:
        rebuild = threading.Thread(target=lambda: published.update(
            refresh(cfg.paths.data, second_model, cfg.paths.index, delta, kind="exact", recall=None)))
        rebuild.start()
        while rebuild.is_alive() and not list(Path(cfg.paths.index).glob(".refresh-*")):
            threading.Event().wait(0.001)  # its work dir appears once the cut-off is taken
        # Writes all through the rebuild come after its cut-off: the swap must replay them onto the new
        # bundle (910001, written before, is folded into it). Three more land after the rebuild ended.
        while rebuild.is_alive() or sum(i < 0 for i in written) < 3:
            item_id = 910100 + len(written)
            mid_rebuild = rebuild.is_alive()
            row = new_item(items, "cat_0003", str(item_id), template_rank=len(written) % 5)
            assert httpx.post(f"{handle.url}/v1/items", json={"items": [row]}, headers=AUTH).status_code == 200
            written.append(item_id if mid_rebuild else -item_id)  # negative: written after the rebuild
            if len(written) == 1:
                assert httpx.patch(f"{handle.url}/v1/items/910001", json={"available": False},
                                   headers=AUTH).status_code == 200
        rebuild.join()
        r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
        served = len(load.results)
        while len(load.results) < served + 50:  # keep requests flowing after the swap
            threading.Event().wait(0.05)
    delta.close()
    during = sum(i > 0 for i in written)
    written = [abs(i) for i in written]
    new = handle.retriever.holder.current()
    new_pair = (new.model_version, new.version)
    assert new.version == Path(published["path"]).name and new_pair[0] != old_pair[0]
    assert published["delta_seq"] >= 1 and during >= 1, "writes ran during the rebuild"
    statuses = {s for s, _, _ in load.results}
    pairs = {(m, v) for _, m, v in load.results}
    assert statuses == {200}, statuses
    assert pairs <= {old_pair, new_pair} and new_pair in pairs, pairs
    # Nothing acknowledged is lost: items written before the cut-off (folded) and after it (replayed).
    cat3 = candidate_ids(handle.url, "x", 1000, ["cat_0003"])
    assert len(cat3) < 1000 and not set(written) - set(cat3)
    assert 910001 not in candidate_ids(handle.url, "x", 1000, ["cat_0002"])  # its availability change too
    assert "910001" in new.item_internal and all(str(i) in new.item_internal for i in written)


def test_watcher_picks_up_a_published_bundle_and_rollback(tmp_path: Path, bundle_paths, items) -> None:
    cfg = make_root(tmp_path, bundle_paths, poll_s=0.2)
    handle = start_background(cfg)
    try:
        first = handle.retriever.holder.current().version
        delta = open_delta_log("embedded", cfg.freshness.delta_path)
        published = Path(refresh(cfg.paths.data, bundle_paths["model"], cfg.paths.index, delta, kind="exact")["path"])
        delta.close()
        wait_for(lambda: handle.retriever.holder.current().version == published.name)
        from towerann.index.snapshot import rollback

        assert rollback(cfg.paths.index) == first
        wait_for(lambda: handle.retriever.holder.current().version == first)
        assert httpx.get(f"{handle.url}/readyz").json()["index_version"] == first
    finally:
        handle.stop()


def wait_for(cond: Any, timeout_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _metric(url: str, outcome: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("towerann_bundle_reloads_total") and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_corrupted_or_incompatible_bundle_is_refused_and_the_old_one_keeps_serving(server, items,
                                                                                   second_model) -> None:
    handle, cfg = server
    serving = handle.retriever.holder.current().version
    delta = open_delta_log("embedded", cfg.freshness.delta_path)
    corrupt = Path(refresh(cfg.paths.data, cfg.paths.model, cfg.paths.index, delta, kind="exact")["path"])
    delta.close()
    ids = corrupt / "external_ids.npy"
    ids.write_bytes(ids.read_bytes()[:-16] + b"\0" * 16)  # flipped bytes: the checksum no longer matches
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 409 and r.json()["outcome"] == "refused" and "checksum" in r.json()["error"].lower()
    assert httpx.get(f"{handle.url}/readyz").json()["index_version"] == serving
    assert len(candidate_ids(handle.url, "1", 10)) == 10

    # An index paired with another model's towers: a copy of the bundle with the second model inside.
    import shutil

    mixed = corrupt.parent / (serving + "-mixed")
    shutil.copytree(corrupt.parent / serving, mixed)
    shutil.rmtree(mixed / "model")
    shutil.copytree(second_model, mixed / "model")
    set_current(corrupt.parent, mixed.name)
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 409 and "model" in r.json()["error"]
    assert httpx.get(f"{handle.url}/readyz").json()["index_version"] == serving
    assert _metric(handle.url, "refused") == 2.0


# ---- restart ------------------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_killed_server_keeps_every_acknowledged_write(store: str, tmp_path: Path, bundle_paths, items,
                                                      request: pytest.FixtureRequest) -> None:
    """kill -9 after the writes were acknowledged; the restarted server replays the delta log (a SQLite
    file, or with a Redis feature store a stream in that Redis) onto the bundle."""
    cfg = make_root(tmp_path, bundle_paths)
    if store == "redis":  # a database of its own on the session's redis-server: the stream key is fixed
        import redis

        store = request.getfixturevalue("redis_server").rsplit("/", 1)[0] + "/9"
        redis.Redis.from_url(store).flushdb()
    toml = tmp_path / "towerann.toml"
    toml.write_text(f"""
[paths]
index = "{cfg.paths.index}"
data = "{cfg.paths.data}"
[features]
store = "{store}"
path = "{cfg.features.path}"
[freshness]
delta_path = "{cfg.freshness.delta_path}"
token_file = "{cfg.freshness.token_file}"
poll_s = 0.0
""")
    start = lambda: start_subprocess(cfg.paths.index, store, cfg.features.path, config=toml)  # noqa: E731
    first = start()
    added = [new_item(items, "cat_0004", str(920000 + i), template_rank=i) for i in range(5)]
    hidden = [str(i) for i in items[items["category"] == "cat_0004"]["item_id"].head(3)]
    try:
        for row in added:
            assert httpx.post(f"{first.url}/v1/items", json={"items": [row]}, headers=AUTH).status_code == 200
        for item in hidden:
            assert httpx.patch(f"{first.url}/v1/items/{item}", json={"available": False},
                               headers=AUTH).status_code == 200
    finally:
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
    second = start()
    try:
        got = set(candidate_ids(second.url, "y", 1000, ["cat_0004"]))
        assert {int(r["item_id"]) for r in added} <= got
        assert not {int(i) for i in hidden} & got
    finally:
        second.stop()
    if store.startswith("redis://"):  # the writes went to the Redis stream, not to a SQLite file
        assert not Path(cfg.freshness.delta_path).exists()
        delta = open_delta_log(store)
        assert [e.op for e in delta.since(0)] == ["upsert"] * len(added) + ["available"] * len(hidden)
        delta.close()


def test_item_write_applies_to_the_served_index_at_once_in_python(server, items) -> None:
    """The Python API: ItemWriter on the running server's bundle (what the endpoints call)."""
    handle, _ = server
    writer = handle.service.writer
    out = writer.upsert([new_item(items, "cat_0006", "930001")])
    assert out["upserted"] == 1 and out["seq"] >= 1
    assert 930001 in candidate_ids(handle.url, "z", 1000, ["cat_0006"])
    vectors = handle.retriever.holder.current().index
    assert len(vectors) == 2001 and np.isfinite(out["seq"])

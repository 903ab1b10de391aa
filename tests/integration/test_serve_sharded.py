"""A sharded bundle (shards in the server process) built and served like any other, over real HTTP.

The same catalog, model and users as the plain exact bundle of tests/integration/conftest.py:
a 3-shard exact bundle must answer /v1/candidates exactly as the unsharded one does, live item
writes must land on the owning shard and be in the very next answer, and `towerann index build
--kind sharded` must tune (and pass) the shards' own search params.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ann_catalog import AUTH, server_config

from towerann.cli import main
from towerann.data.dataset import read_items
from towerann.freshness.publish import publish_bundle
from towerann.index.shard_hash import shard_of
from towerann.index.sharded import ShardedIndex
from towerann.server.server import ServerHandle, start_background
from towerann.serving.bundle import RetrievalBundle

S = 3
USERS = [str(u) for u in range(12)]


@pytest.fixture(scope="module")
def servers(
    bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerHandle]]:
    """The same catalog served twice with item writes on: plain exact, and 3 exact shards."""
    handles: dict[str, ServerHandle] = {}
    try:
        for name, params in (("plain", None), ("sharded", {"shards": S, "backend": "exact"})):
            tmp = tmp_path_factory.mktemp(f"serve-{name}")
            publish_bundle(
                tmp / "indexes",
                bundle_paths["model"],
                bundle_paths["vectors"],
                kind="exact" if params is None else "sharded",
                params=params,
            )
            handles[name] = start_background(server_config(tmp, tmp / "indexes", bundle_paths))
        yield handles
    finally:
        for h in handles.values():
            h.stop()


def answer(url: str, user: str, k: int = 50, **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/candidates", json={"user_id": user, "k": k, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(body: dict[str, Any]) -> list[Any]:
    return [c["item_id"] for c in body["candidates"]]


def both(servers: dict[str, ServerHandle], user: str, k: int = 50, **extra: Any) -> list[Any]:
    """The sharded server's answer, checked equal (ids and scores) to the unsharded one's."""
    plain, sharded = (answer(servers[n].url, user, k, **extra) for n in ("plain", "sharded"))
    assert ids_of(sharded) == ids_of(plain), user
    np.testing.assert_allclose(
        [c["score"] for c in sharded["candidates"]], [c["score"] for c in plain["candidates"]], atol=1e-5
    )
    assert "partial" not in sharded and "missing_shards" not in sharded  # every shard answered
    return ids_of(sharded)


def test_sharded_bundle_answers_as_the_unsharded_one(servers) -> None:
    index = servers["sharded"].retriever.holder.current().index
    assert isinstance(index, ShardedIndex) and index.n_shards == S and min(index.shard_counts()) > 0
    ready = httpx.get(f"{servers['sharded'].url}/readyz").json()
    assert ready["index"] == f"sharded({S} x exact)" and ready["items"] == 2000
    assert ready["dependencies"]["shards"] == "up" and not ready["degraded"]
    assert "shards" not in httpx.get(f"{servers['plain'].url}/readyz").json()["dependencies"]
    for user in USERS:
        assert len(both(servers, user)) == 50
    categories = servers["plain"].retriever.holder.current().category_names[:2]
    assert len(both(servers, "3", 30, filter={"categories": categories})) == 30


def test_live_writes_land_on_the_owning_shard_and_in_the_next_answer(servers, bundle_paths) -> None:
    items = read_items(bundle_paths["data"])
    category = str(items["category"].iloc[0])
    fan = "fan-of-" + category
    clicked = [str(i) for i in items[items["category"] == category]["item_id"].head(8)]
    for url in (s.url for s in servers.values()):
        for item in clicked:
            assert httpx.post(f"{url}/v1/events", json={"user_id": fan, "item_id": item}).status_code == 200
    index = servers["sharded"].retriever.holder.current().index
    before = index.shard_counts()
    template = items[items["item_id"].astype(str) == clicked[0]].iloc[0]
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in template.items()}
    new = {**row, "item_id": "770001", "available": True}
    for url in (s.url for s in servers.values()):
        r = httpx.post(f"{url}/v1/items", json={"items": [new]}, headers=AUTH)
        assert r.status_code == 200 and r.json()["upserted"] == 1, r.text
    bundle = servers["sharded"].retriever.holder.current()
    owner = int(shard_of([bundle.item_internal.get("770001")], S)[0])
    assert index.shard_counts() == [c + (s == owner) for s, c in enumerate(before)]
    top = both(servers, fan, 1000)
    assert 770001 in top  # embedded from its content, like the items its fan clicked

    # availability and deletion reach the shard holding the item, from the next request on
    first = both(servers, "5", 10)[0]
    for url in (s.url for s in servers.values()):
        assert httpx.patch(f"{url}/v1/items/{first}", json={"available": False}, headers=AUTH).status_code == 200
    assert first not in both(servers, "5", 200)
    for url in (s.url for s in servers.values()):
        assert httpx.patch(f"{url}/v1/items/{first}", json={"available": True}, headers=AUTH).status_code == 200
        assert httpx.delete(f"{url}/v1/items/770001", headers=AUTH).status_code == 200
    got = both(servers, fan, 1000)
    assert first in both(servers, "5", 10) and 770001 not in got
    assert sum(index.shard_counts()) == 2000 and index.shard_counts()[owner] == before[owner]


def test_a_sharded_bundle_hot_swaps_with_the_delta_log_replayed(servers, bundle_paths) -> None:
    """Another shard count, published under the served root: the reloader loads it, replays the item
    writes of the test above onto its shards, and it answers as the unsharded server does."""
    handle = servers["sharded"]
    publish_bundle(
        handle.service.cfg.paths.index,
        bundle_paths["model"],
        bundle_paths["vectors"],
        kind="sharded",
        params={"shards": 2, "backend": "exact"},
    )
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
    assert httpx.get(f"{handle.url}/readyz").json()["index"] == "sharded(2 x exact)"
    index = handle.retriever.holder.current().index
    assert index.n_shards == 2 and sum(index.shard_counts()) == 2000  # 770001 was added, then deleted
    for user in USERS[:4]:
        both(servers, user)
    schema = httpx.get(f"{handle.url}/openapi.json").json()["components"]["schemas"]["CandidatesResponse"]
    assert {"partial", "missing_shards"} <= set(schema["properties"]) and "partial" not in schema["required"]


def test_index_build_kind_sharded_tunes_the_shards_search_params(
    bundle_paths, tmp_path, capsys, fixed_tuner_costs
) -> None:
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel

    queries = heldout_user_queries(TwoTowerModel.load(bundle_paths["model"]), bundle_paths["data"], 200, 0)
    np.save(tmp_path / "q.npy", queries)
    out = tmp_path / "snaps"
    base = ["index", "build", "--vectors", str(bundle_paths["vectors"]), "--out", str(out)]
    assert main([*base, "--kind", "hnsw", "--shards", "2"]) == 2  # --shards belongs to --kind sharded
    assert "--kind sharded" in capsys.readouterr().err
    assert main([*base, "--kind", "sharded", "--shard-kind", "hnsw"]) == 2  # no --shards
    assert (
        main(
            [
                *base,
                "--kind",
                "sharded",
                "--shards",
                "2",
                "--shard-kind",
                "hnsw",
                "--param",
                "M=8",
                "--param",
                "ef_construction=16",
                "--param",
                "exact_below=0",
                "--recall",
                "0.9",
                "--k",
                "20",
                "--queries",
                str(tmp_path / "q.npy"),
            ]
        )
        == 0
    )
    snap = out / (out / "CURRENT").read_text().strip()
    top = json.loads((snap / "manifest.json").read_text())
    assert top["backend"] == "sharded" and top["build_params"] == {
        "shards": 2,
        "backend": "hnsw",
        "M": 8,
        "ef_construction": 16,
    }
    tuned = top["tuning"]["params"]
    # exact_below=0: the catalog's unavailable items make every search masked; through the graph walk anyway
    assert set(tuned) == {"ef"} and top["search_defaults"]["ef"] == tuned["ef"]
    assert top["search_defaults"]["exact_below"] == 0
    assert len(top["tuning"]["curve"]) > 1  # the shards' ef was swept, not one setting taken
    for s in range(2):  # each shard's own manifest carries the settings it is served with
        shard = json.loads((snap / f"shard-{s:03d}" / "manifest.json").read_text())
        assert shard["backend"] == "hnsw" and shard["search_defaults"]["ef"] == tuned["ef"]
        assert shard["search_defaults"]["exact_below"] == 0
    # a plain snapshot served with its model: shards loaded in this process, the tuned ef sent to them
    b = RetrievalBundle.load(out, model_dir=bundle_paths["model"])
    assert isinstance(b.index, ShardedIndex) and len(b.index) == 2000
    assert b.index.search_defaults["ef"] == tuned["ef"]
    # an explicit search param wins over tuning, on every shard
    assert (
        main(
            [
                *base,
                "--kind",
                "sharded",
                "--shards",
                "2",
                "--param",
                "ef=33",
                "--recall",
                "0.9",
                "--k",
                "20",
                "--queries",
                str(tmp_path / "q.npy"),
            ]
        )
        == 0
    )
    snap = out / (out / "CURRENT").read_text().strip()
    assert json.loads((snap / "manifest.json").read_text())["search_defaults"]["ef"] == 33
    assert json.loads((snap / "shard-001" / "manifest.json").read_text())["search_defaults"]["ef"] == 33
    assert main(["index", "tune", str(out), "--recall", "0.9", "--queries", str(tmp_path / "q.npy")]) == 2
    assert "does not re-tune a sharded snapshot" in capsys.readouterr().err


def test_serve_flags_for_ray_are_checked_before_anything_starts(servers, capsys) -> None:
    from towerann.server.commands import main as serve

    plain_root = servers["plain"].service.cfg.paths.index
    assert serve(["serve", "--index", plain_root, "--shard-deadline-ms", "100"]) == 2
    assert "--shard-deadline-ms goes with --ray" in capsys.readouterr().err
    # an unsharded bundle: refused from its manifest, before any Ray cluster is contacted (none runs here)
    assert serve(["serve", "--index", plain_root, "--store", "memory", "--ray", "127.0.0.1:9"]) == 2
    assert "serve sharded snapshots" in capsys.readouterr().err

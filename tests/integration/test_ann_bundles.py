"""Serving through the ANN libraries: hnsw, ivfpq and scann bundles over real HTTP, on the library path.

Every bundle here is built with exact_below=0 (tests/integration/ann_catalog.py), so a masked search
(unavailable, removed or filtered items) goes through faiss / ScaNN as it does in production at scale,
not through the brute-force shortcut every search of a small test catalog took before. Checked
against `index.exact_search` on the same bundle, and refused when the library path is too poor.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ann_catalog
import httpx
import numpy as np
import pandas as pd
import pytest
from ann_catalog import ANN_KINDS, AUTH, KINDS, assert_library_path, build_library_index, new_root, server_config

from towerann.artifacts import write_manifest
from towerann.data.dataset import read_interactions, read_items
from towerann.freshness.publish import publish_bundle
from towerann.freshness.reload import validation_recall
from towerann.index import Filter
from towerann.index.snapshot import set_current
from towerann.server.server import ServerHandle, start_background
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.retriever import Retriever


@pytest.fixture(scope="module")
def catalog(bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ann_catalog.catalog(tmp_path_factory.getbasetemp(), bundle_paths)


@pytest.fixture(scope="module")
def items(catalog: dict[str, Path]) -> pd.DataFrame:
    frame = read_items(catalog["data"])
    counts = read_interactions(catalog["data"])["item_id"].value_counts()
    return frame.assign(pop=frame["item_id"].map(counts).fillna(0)).sort_values("pop", ascending=False)


def template(catalog: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    return ann_catalog.template(tmp_path_factory.getbasetemp(), catalog, kind)


@pytest.fixture
def serve(tmp_path: Path, catalog: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """serve(kind) -> (handle, root): a server in a thread on a copy of the kind's template bundle."""
    handles: list[ServerHandle] = []

    def start(kind: str, features: bool = False) -> tuple[ServerHandle, Path]:
        root = new_root(tmp_path / "indexes", template(catalog, tmp_path_factory, kind))
        cfg = server_config(tmp_path, root, catalog)
        if features:  # the dataset's users (static features, recent items) in the server's store
            from towerann.features import open_store
            from towerann.features.loader import load_dataset_features

            store = open_store("embedded", path=cfg.features.path)
            load_dataset_features(store, catalog["data"])
            store.close()
        handles.append(start_background(cfg))
        return handles[-1], root

    yield start
    for handle in handles:
        handle.stop()


def post_candidates(url: str, user: str, k: int, categories: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user, "k": k}
    if categories:
        body["filter"] = {"categories": categories}
    r = httpx.post(f"{url}/v1/candidates", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(url: str, outcome: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("towerann_bundle_reloads_total") and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- served candidates vs exact search -----------------------------------------------------------

# Served recall vs exact search on the same bundle, after the writes in the test (~30 items hidden,
# 10 deleted, 30 added), for 60 of the dataset's users with their features loaded:
# (unfiltered k=100, one category (~18% of items) k=50, unfiltered k=1000 for 15 users).
# Measured over 8 test sessions (each builds its own templates; ann_catalog.py):
#   hnsw  ef 256, M 32                0.9963       | 0.892        | 0.9983   (same every session)
#   ivfpq nprobe 32 of 76, rerank 1000 0.998       | 1.0          | 0.9257   (same every session)
#   scann 32 of 55 leaves, reorder 400 0.9953-0.9993 | 0.9973-0.9993 | 0.9612-0.9833
# Brute-force fallbacks (a library answer short of k, counted below): none for hnsw (8 sessions; 0-7
# of the 60 filtered requests with a tuned ef=300 graph) and ivfpq, none on the unfiltered k=100
# requests of any kind; scann ~50 of the 60 filtered requests (the post-filtered over-fetch of ~350
# rarely holds 50 items of an 18% category), so its filtered recall is mostly brute force's.
RECALL_FLOOR = {
    "exact": (1.0, 1.0, 1.0),
    "hnsw": (0.98, 0.80, 0.98),
    "ivfpq": (0.98, 0.98, 0.88),
    "scann": (0.95, 0.97, 0.90),
}


def _spy(index: Any) -> dict[str, int]:
    """Count the index's library searches and its brute-force passes (instance attributes shadow the methods)."""
    counts = {"library": 0, "exact": 0}
    library, exact = index._search, index._exact

    def search(*a: Any, **kw: Any) -> Any:
        counts["library"] += 1
        return library(*a, **kw)

    def brute(*a: Any, **kw: Any) -> Any:
        # the recall monitor's exact searches (its own thread, 1% of requests) are not fallbacks
        if threading.current_thread().name != "towerann-recall-monitor":
            counts["exact"] += 1
        return exact(*a, **kw)

    index._search, index._exact = search, brute
    return counts


@pytest.mark.parametrize("kind", KINDS)
def test_served_candidates_match_exact_search_on_the_library_path(kind: str, serve, items) -> None:
    handle, _ = serve(kind, features=True)
    b = handle.retriever.holder.current()
    assert_library_path(b.index, kind)
    users = [str(u) for u in range(60)]
    # A mask with holes and (scann) a delta tier: the writes every library must search around.
    top = {u: post_candidates(handle.url, u, 10)["candidates"] for u in users[:20]}
    hidden = sorted({c["item_id"] for got in top.values() for c in got[:2]})
    deleted = sorted({c["item_id"] for got in top.values() for c in got[2:4]} - set(hidden))[:10]
    for item in hidden:
        assert httpx.patch(f"{handle.url}/v1/items/{item}", json={"available": False}, headers=AUTH).status_code == 200
    for item in deleted:
        assert httpx.delete(f"{handle.url}/v1/items/{item}", headers=AUTH).status_code == 200
    rows = items[items["available"]].head(30)
    added = [
        {
            **{k: (v.item() if hasattr(v, "item") else v) for k, v in row.drop(["pop"]).items()},
            "item_id": str(960000 + i),
        }
        for i, (_, row) in enumerate(rows.iterrows())
    ]
    r = httpx.post(f"{handle.url}/v1/items", json={"items": added}, headers=AUTH)
    assert r.status_code == 200 and r.json()["upserted"] == 30
    gone = set(hidden) | set(deleted)
    category_of = {
        **dict(zip(items["item_id"].tolist(), items["category"].tolist())),
        **{int(row["item_id"]): row["category"] for row in added},
    }

    counts = _spy(b.index)
    shapes = ((100, None), (50, ["cat_0002"]), (1000, None))
    served: dict[tuple[int, int], dict[str, Any]] = {}
    fallbacks = {s: 0 for s in range(len(shapes))}
    for u in users:
        for s, (k, cats) in enumerate(shapes):
            if k == 1000 and int(u) >= 15:
                continue  # k=1000 for a few users: big answers
            before = dict(counts)
            served[(int(u), s)] = post_candidates(handle.url, u, k, cats)
            assert counts["library"] == before["library"] + 1  # one library search per request
            fallbacks[s] += counts["exact"] - before["exact"]
    del b.index._search, b.index._exact
    print(f"fallbacks {kind}: {fallbacks}")
    assert fallbacks[0] == 0, fallbacks  # the plain top-100 is the library's answer, on every backend
    if kind in ("hnsw", "ivfpq"):
        assert fallbacks[2] == 0, fallbacks  # and so is the top-1000
    if kind == "ivfpq":
        assert fallbacks[1] == 0, fallbacks  # 32 of 76 lists (widened for the filter) always fill k=50

    cat2 = b.category_code["cat_0002"]
    recalls: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for (u, s), body in served.items():
        k, cats = shapes[s]
        got = [c["item_id"] for c in body["candidates"]]
        assert len(got) == k == len(set(got)) and not gone & set(got)
        assert body["index_version"] == b.version and not body.get("degraded")
        assert not cats or {category_of[i] for i in got} == set(cats)
        f = handle.retriever.store.get_one(str(u))  # the query the server ran (the scores below check it)
        q = b.encoder.encode(str(u), f.static, Retriever._history(b, f.session, f.recent_items))
        truth = b.index.exact_search(q[None, :], k, Filter(categories=frozenset({cat2})) if cats else None)
        truth_ids = b.external_ids[truth.ids[0]].tolist()
        exact_score = dict(zip(truth_ids, truth.scores[0].tolist()))
        shared = [c for c in body["candidates"] if c["item_id"] in exact_score]
        assert shared and all(abs(c["score"] - exact_score[c["item_id"]]) < 1e-4 for c in shared)
        recalls[s].append(len(shared) / k)
    measured = tuple(round(float(np.mean(recalls[s])), 4) for s in range(3))
    print(f"served recall {kind}: {measured}")
    assert all(m >= f for m, f in zip(measured, RECALL_FLOOR[kind])), (kind, measured, RECALL_FLOOR[kind])


# ---- bundles the server must refuse ------------------------------------------------------------

# Search (and build) settings that wreck recall. validation_recall (recall@100 of 64 made-up sessions
# vs exact search) measured: hnsw 0.32, ivfpq 0.60, scann 0.46 - against 0.966 / 0.977 / 0.97-0.98 for
# the templates and min_recall 0.8 (server_config).
CRIPPLED = {
    "hnsw": {"M": 2, "ef_construction": 4, "ef": 1},
    "ivfpq": {"nlist": 4, "pq_m": 1, "nprobe": 1, "rerank": 0},
    # One of 15 leaves (~200 of the 3,000 items: a leaf of the default 55 holds fewer than k=100, and short
    # rows go exact). Leaf sizes follow the catalog's clusters, so 2 of 55 leaves validated at 0.857-0.872
    # once the tree's seeding was fixed (k-means++): over min_recall 0.8, and swapped in. 1 of 15: 0.404.
    "scann": {"num_leaves": 15, "leaves": 1, "reorder": 100},
}


@pytest.mark.parametrize("kind", ANN_KINDS)
def test_a_bundle_below_min_recall_is_refused_and_the_old_one_keeps_serving(kind: str, serve, catalog) -> None:
    handle, root = serve(kind)
    serving = handle.retriever.holder.current().version
    index = build_library_index(catalog, kind, **CRIPPLED[kind])
    assert_library_path(index, kind)  # crippled, but still the library: no brute-force rescue
    poor = publish_bundle(root, catalog["model"], catalog["vectors"], index=index)
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 409 and r.json()["outcome"] == "refused", r.text
    found = re.search(r"recall@100 vs exact search ([0-9.]+) < min_recall 0.8", r.json()["error"])
    # The number is the crippled bundle's own (how far below 0.8 depends on the session's model:
    # 0.40 for ScaNN on one of 15 leaves), not a constant.
    assert found and float(found.group(1)) < 0.8, r.json()["error"]
    assert float(found.group(1)) == pytest.approx(validation_recall(RetrievalBundle.load(poor)), abs=1e-3)
    assert r.json()["index_version"] == poor.name
    assert httpx.get(f"{handle.url}/readyz").json()["index_version"] == serving
    assert post_candidates(handle.url, "1", 10)["index_version"] == serving
    assert (_metric(handle.url, "refused"), _metric(handle.url, "swapped")) == (1.0, 0.0)
    # The same check lets a good bundle of the same kind through (a copy of the one being served).
    good = root / (poor.name + "-good")
    shutil.copytree(root / serving, good)
    set_current(root, good.name)
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["outcome"] == "swapped" and r.json()["validation_recall"] >= 0.9, r.text
    assert post_candidates(handle.url, "1", 10)["index_version"] == good.name
    assert (_metric(handle.url, "refused"), _metric(handle.url, "swapped")) == (1.0, 1.0)


class _Unpickled:
    """Unpickling this creates `marker`: proof that something unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_pickled_scann_id_file_is_refused_at_load_and_on_reload(serve, tmp_path: Path) -> None:
    from towerann.artifacts import sha256_file
    from towerann.errors import ArtifactError

    handle, root = serve("scann")
    serving = handle.retriever.holder.current().version
    bad = root / (serving + "-pickled")
    shutil.copytree(root / serving, bad)
    marker = tmp_path / "unpickled"
    pkl = bad / "scann" / "scann_docids.pkl"  # what ScaNN's own serialize() writes, and load_searcher() unpickles
    pkl.write_bytes(pickle.dumps(_Unpickled(marker)))
    # Listed in the manifest with its checksum, like every file of the bundle: only the pickle check
    # stands between this file and pickle.load.
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["checksums"]["scann/scann_docids.pkl"] = sha256_file(pkl)
    write_manifest(bad / "manifest.json", manifest)
    with pytest.raises(ArtifactError, match="pickled"):
        RetrievalBundle.load(bad)
    assert not marker.exists()
    set_current(root, bad.name)
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
    assert r.status_code == 409 and r.json()["outcome"] == "refused" and "pickled" in r.json()["error"], r.text
    assert not marker.exists()
    assert httpx.get(f"{handle.url}/readyz").json()["index_version"] == serving
    assert _metric(handle.url, "refused") == 1.0


# ---- tuning on the path that serves -------------------------------------------------------------


def test_tuning_with_explicit_search_params_measures_the_path_the_bundle_serves(catalog) -> None:
    from towerann.data.vectors_dir import read_vectors
    from towerann.index.build import Tuning, build_index
    from towerann.index.tune import recall_at_k

    vs = read_vectors(catalog["vectors"])
    q = ann_catalog.tuning_queries(catalog)[:500]  # tune() uses at most 500: the same queries here
    index = build_index(
        vs.vectors,
        vs.ids,
        vs.categories,
        vs.available,
        kind="scann",
        params={"exact_below": 0},
        tuning=Tuning(q, 100, 0.95),
        calibrate_filters=False,  # the tuner's own measurement is under test, not the filter plan made after it
    )
    served = recall_at_k(index.search(q, 100).ids, index.exact_search(q, 100).ids)
    assert index.tuning["recall"] == pytest.approx(served, abs=1e-6), (index.tuning, served)

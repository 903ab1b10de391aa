"""Filters on declared attributes over real HTTP: AND across keys, OR within a list, live attribute writes.

The shared 2,000-item bundle fixture's vectors, published as an HNSW bundle with two attributes
(label: three values by catalog row, in_stock: a boolean; the catalog's own brand column is a
tower feature, filtered on in the last test, which embeds it as an attribute) and served by a real uvicorn server; an
item write changes an attribute and the next request sees it, and a restarted server still does
(the delta log is replayed onto the published bundle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
from ann_catalog import AUTH, server_config

from towerann.data.dataset import read_items
from towerann.data.vectors_dir import read_vectors
from towerann.freshness.publish import publish_bundle
from towerann.server.server import start_background

LABELS = ["acme", "globex", "initech"]


def ids(url: str, flt: dict[str, Any], k: int = 1000) -> set[str]:
    r = httpx.post(f"{url}/v1/candidates", json={"user_id": "u1", "k": k, "filter": flt})
    assert r.status_code == 200, r.text
    return {str(c["item_id"]) for c in r.json()["candidates"]}


def test_attribute_filters_and_live_attribute_writes(tmp_path: Path, bundle_paths: dict[str, Path]) -> None:
    vs = read_vectors(bundle_paths["vectors"])
    n = len(vs.external_ids)
    label = (np.arange(n) % 3).astype(np.int32)
    in_stock = ((np.arange(n) // 3) % 2).astype(np.int32)  # code 1 = "true"
    root = tmp_path / "indexes"
    publish_bundle(
        root,
        bundle_paths["model"],
        vs,
        kind="hnsw",
        params={"exact_below": 0},
        attributes={"label": (label, LABELS), "in_stock": (in_stock, ["false", "true"])},
    )
    items = read_items(bundle_paths["data"])
    row_of = {str(i): r for r, i in enumerate(vs.external_ids.tolist())}
    avail = {str(i): bool(a) for i, a in zip(items["item_id"], items["available"])}
    ext = [str(i) for i in vs.external_ids.tolist()]
    cat_of = {str(i): c for i, c in zip(items["item_id"], items["category"])}

    def expected(labels: list[int], stock: int | None = None, category: str | None = None) -> set[str]:
        return {
            e
            for e in ext
            if avail[e]
            and label[row_of[e]] in labels
            and (stock is None or in_stock[row_of[e]] == stock)
            and (category is None or cat_of[e] == category)
        }

    cfg = server_config(tmp_path, root, bundle_paths)
    handle = start_background(cfg)
    try:
        url = handle.url
        # AND across keys, OR within a list; k (1000) exceeds what qualifies, so every allowed item comes back
        acme_in_stock = expected([0], 1)
        assert 0 < len(acme_in_stock) < 1000
        assert ids(url, {"label": ["acme"], "in_stock": [True]}) == acme_in_stock
        assert ids(url, {"label": ["acme"], "in_stock": ["true"]}) == acme_in_stock  # "true" is true
        assert ids(url, {"label": ["acme", "initech"], "categories": ["cat_0001"]}) == expected(
            [0, 2], category="cat_0001"
        )
        top = ids(url, {"label": ["globex"]}, k=20)  # the library's answer: only allowed items
        assert len(top) == 20 and top <= expected([1])
        for bad in ({"label": ["hooli"]}, {"colour": ["red"]}, {"label": "acme"}, {"label": [3]}):
            r = httpx.post(f"{url}/v1/candidates", json={"user_id": "u1", "k": 5, "filter": bad})
            assert r.status_code in (400, 422), (bad, r.text)

        # an item write moves one acme item to a label never seen before; another write leaves label out
        moved = sorted(acme_in_stock)[0]
        kept = sorted(acme_in_stock)[1]
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in items.iloc[row_of[moved]].items()}
        r = httpx.post(f"{url}/v1/items", json={"items": [{**row, "item_id": moved, "label": "hooli"}]}, headers=AUTH)
        assert r.status_code == 200, r.text
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in items.iloc[row_of[kept]].items()}
        r = httpx.post(f"{url}/v1/items", json={"items": [{**row, "item_id": kept}]}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert ids(url, {"label": ["hooli"]}) == {moved}
        assert ids(url, {"label": ["acme"], "in_stock": [True]}) == acme_in_stock - {moved}
        r = httpx.post(f"{url}/v1/items", json={"items": [{**row, "item_id": kept, "label": 7}]}, headers=AUTH)
        assert r.status_code == 400, r.text
        r = httpx.post(f"{url}/v1/items", json={"items": [{**row, "item_id": kept, "label": None}]}, headers=AUTH)
        assert r.status_code == 200, r.text  # null: no label any more, so no label filter matches it
        assert ids(url, {"label": ["acme"], "in_stock": [True]}) == acme_in_stock - {moved, kept}
        assert kept in ids(url, {"in_stock": [True], "categories": [cat_of[kept]]})  # the other attribute stays
    finally:
        handle.stop()

    handle = start_background(cfg)  # a restart replays the delta log onto the published bundle
    try:
        assert ids(handle.url, {"label": ["hooli"]}) == {moved}
        assert ids(handle.url, {"label": ["acme"], "in_stock": [True]}) == acme_in_stock - {moved, kept}
    finally:
        handle.stop()


def test_embed_keeps_declared_columns_as_attributes_and_the_bundle_filters_on_them(
    tmp_path: Path, bundle_paths: dict[str, Path]
) -> None:
    from towerann.data.attributes import read_vector_attributes
    from towerann.embed.runner import embed_catalog
    from towerann.features import open_store
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    items = read_items(bundle_paths["data"])
    items["in_stock"] = np.arange(len(items)) % 4 != 0  # a boolean column
    items.to_parquet(tmp_path / "items.parquet", index=False)
    vectors = embed_catalog(
        bundle_paths["model"],
        tmp_path / "items.parquet",
        tmp_path / "vectors",
        progress=False,
        attributes=("brand", "in_stock"),
    )
    attrs = read_vector_attributes(vectors)
    codes, values = attrs["brand"]
    assert values == sorted(set(items["brand"])) and [values[c] for c in codes] == items["brand"].tolist()
    assert attrs["in_stock"][1] == ["false", "true"]
    assert (attrs["in_stock"][0] == items["in_stock"].to_numpy().astype(np.int32)).all()

    publish_bundle(tmp_path / "indexes", bundle_paths["model"], vectors, kind="exact")  # attributes from the path
    bundle = RetrievalBundle.load(tmp_path / "indexes")
    assert sorted(bundle.attribute_values) == ["brand", "in_stock"]
    retriever = Retriever(BundleHolder(bundle), open_store("memory"), max_k=2000)
    some = items["brand"].value_counts().index[:2].tolist()
    want = items[items["brand"].isin(some) & ~items["in_stock"] & items["available"]]["item_id"]
    got = retriever.candidates("u1", 2000, {"brand": some, "in_stock": [False]}).item_ids
    assert 0 < len(want) and sorted(got) == sorted(want.tolist())


def test_a_refresh_keeps_declared_attributes_with_the_values_item_writes_gave_them(
    tmp_path: Path, bundle_paths: dict[str, Path]
) -> None:
    from towerann.freshness.deltalog import open_delta_log
    from towerann.freshness.refresh import refresh
    from towerann.serving.bundle import RetrievalBundle

    items = read_items(bundle_paths["data"])
    moved = items.iloc[0]
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in moved.items()}
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    delta.append("upsert", str(moved["item_id"]), {**row, "available": True, "brand": "brand-new-in-the-log"})
    out = refresh(
        bundle_paths["data"],
        bundle_paths["model"],
        tmp_path / "indexes",
        delta,
        kind="exact",
        recall=None,
        attributes=("brand",),
    )
    bundle = RetrievalBundle.load(out["path"])
    assert "brand-new-in-the-log" in bundle.attribute_values["brand"]  # the write's value, folded in
    from towerann.features import open_store
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    retriever = Retriever(BundleHolder(bundle), open_store("memory"), max_k=2000)
    assert retriever.candidates("u1", 50, {"brand": ["brand-new-in-the-log"]}).item_ids == [moved["item_id"]]

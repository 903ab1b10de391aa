"""Vectors made elsewhere, served as they are: `towerann refresh --vectors` -> `serve` with no model.

A 20k-item Parquet catalog (seeded clustered vectors, dim 32, integer ids, a category and a "brand"
attribute column) becomes a vectors-only bundle through the CLI; a real server on loopback answers
query_vector requests filtered by brand through HNSW's filtered search (exact_below=0 and
filter_path=filtered: no brute-force fallback), checked against exact search over the same vectors;
a user_id request is a 400; availability and deletes work; a new file version is swapped in; and
`index tune --queries` re-tunes the root without a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ann_catalog import AUTH, TOKEN

from towerann.cli import main
from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.server.server import ServerHandle, start_background

N, DIM, CLUSTERS, K = 20_000, 32, 64, 20
BRANDS = [f"brand-{i}" for i in range(10)]
ID0 = 7_000_000  # integer ids, not row numbers: the server must answer with these
NEW_ID = 99_999_999


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_catalog(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLUSTERS, DIM))
    cluster = rng.integers(0, CLUSTERS, N)
    vectors = _unit(centers[cluster] + 0.35 * rng.normal(size=(N, DIM)))
    return {
        "sku": ID0 + 3 * np.arange(N, dtype=np.int64),
        "emb": vectors,
        "category": np.array([f"c{c % 8}" for c in cluster]),
        "brand": np.array(BRANDS)[rng.integers(0, len(BRANDS), N)],
        "centers": centers,
    }


def write_parquet(path: Path, cat: dict[str, Any]) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(cat["emb"].reshape(-1)), DIM)
    table = pa.table({"sku": cat["sku"], "emb": emb, "category": cat["category"], "brand": cat["brand"]})
    pq.write_table(table, path)


def queries(cat: dict[str, Any], n: int, seed: int = 1) -> np.ndarray:
    """User-like queries: near a cluster, not on an item."""
    rng = np.random.default_rng(seed)
    c = cat["centers"][rng.integers(0, CLUSTERS, n)]
    return _unit(c + 0.5 * rng.normal(size=(n, DIM)))


def refresh_cli(path: Path, root: Path, *extra: str) -> None:
    args = ["refresh", "--vectors", str(path), "--id-column", "sku", "--vector-column", "emb"]
    args += ["--category-column", "category", "--attributes", "brand", "--index", str(root)]
    args += ["--kind", "hnsw", "--recall", "0.95", "--k", "100"]
    args += ["--param", "exact_below=0", "--param", "filter_path=filtered", *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("vectors-only")
    cat = make_catalog()
    write_parquet(tmp / "items.parquet", cat)
    root = tmp / "indexes"
    refresh_cli(tmp / "items.parquet", root)
    (tmp / "token").write_text(TOKEN + "\n")
    cfg = Config(
        serve=ServeConfig(max_k=1000, max_body_bytes=1 << 20),
        # no model anywhere: the default [paths] model does not exist here either
        paths=PathsConfig(index=str(root), model=str(tmp / "no-such-model")),
        features=FeaturesConfig(store="memory"),
        freshness=FreshnessConfig(token_file=str(tmp / "token"), poll_s=0.0),
    )
    handle = start_background(cfg)
    try:
        yield {"handle": handle, "cat": cat, "tmp": tmp, "root": root}
    finally:
        handle.stop()


def ask(handle: ServerHandle, q: np.ndarray, k: int = K, flt: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"query_vector": [float(x) for x in q], "k": k}
    if flt is not None:
        body["filter"] = flt
    return httpx.post(f"{handle.url}/v1/candidates", json=body, timeout=30)


def test_bundle_has_no_model(served: dict[str, Any]) -> None:
    from towerann.artifacts import read_manifest
    from towerann.index.snapshot import FORMAT_VERSION, KIND, resolve

    path = resolve(served["root"])
    assert not (path / "model").exists()
    info = read_manifest(path, KIND, FORMAT_VERSION)["bundle"]
    assert info["model"] is None and info["space_id"].startswith("external-")
    assert info["attributes"]["brand"] == BRANDS
    b = served["handle"].retriever.holder.current()
    assert b.vectors_only and b.index.kind == "hnsw" and "HNSW" in b.index.describe()
    assert b.index.search_defaults["exact_below"] == 0 and b.index.search_defaults["filter_path"] == "filtered"


def test_attribute_filter_matches_exact_search(served: dict[str, Any]) -> None:
    handle, cat = served["handle"], served["cat"]
    qs = queries(cat, 40)
    hits = total = 0
    for i, q in enumerate(qs):
        brand = BRANDS[i % len(BRANDS)]
        r = ask(handle, q, flt={"brand": [brand]})
        assert r.status_code == 200, r.text
        got = r.json()
        ids = [c["item_id"] for c in got["candidates"]]
        assert len(ids) == K and all(type(i) is int for i in ids)  # JSON integers, as the catalog has them
        assert got["model_version"].startswith("external-")
        rows = (np.asarray(ids) - ID0) // 3
        assert (cat["brand"][rows] == brand).all()
        keep = np.flatnonzero(cat["brand"] == brand)
        truth = keep[np.argsort(-(cat["emb"][keep] @ q))[:K]]
        hits += len(set(rows.tolist()) & set(truth.tolist()))
        total += K
    assert hits / total >= 0.95, hits / total


def test_category_and_brand_filter(served: dict[str, Any]) -> None:
    handle, cat = served["handle"], served["cat"]
    r = ask(handle, queries(cat, 1, seed=5)[0], flt={"categories": ["c3"], "brand": ["brand-2", "brand-7"]})
    assert r.status_code == 200, r.text
    rows = (np.asarray([c["item_id"] for c in r.json()["candidates"]]) - ID0) // 3
    assert len(rows) == K and (cat["category"][rows] == "c3").all()
    assert np.isin(cat["brand"][rows], ["brand-2", "brand-7"]).all()


def test_user_id_is_a_400_naming_query_vector(served: dict[str, Any]) -> None:
    r = httpx.post(f"{served['handle'].url}/v1/candidates", json={"user_id": "42", "k": 5})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "no user tower" in error and "query_vector" in error and "\n" not in error


def test_item_writes(served: dict[str, Any]) -> None:
    handle, cat = served["handle"], served["cat"]
    q = queries(cat, 1, seed=9)[0]
    first, second = (c["item_id"] for c in ask(handle, q, k=2).json()["candidates"])
    r = httpx.patch(f"{handle.url}/v1/items/{first}", json={"available": False}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = httpx.delete(f"{handle.url}/v1/items/{second}", headers=AUTH)
    assert r.status_code == 200, r.text
    ids = [c["item_id"] for c in ask(handle, q, k=50).json()["candidates"]]
    assert first not in ids and second not in ids
    # No item tower to embed a new item with: a one-line 400, never a 500.
    r = httpx.post(
        f"{handle.url}/v1/items", json={"items": [{"item_id": "5", "category": "c1"}]}, headers=AUTH, timeout=30
    )
    assert r.status_code == 400, r.text
    assert "no item tower" in r.json()["error"]
    served["hidden"], served["deleted"] = first, second


def test_new_file_version_is_swapped_in(served: dict[str, Any]) -> None:
    handle, cat, tmp, root = served["handle"], served["cat"], served["tmp"], served["root"]
    old = handle.retriever.holder.current().version
    q = queries(cat, 1, seed=11)[0]
    new = {key: value for key, value in cat.items()}
    new["sku"] = np.append(cat["sku"], NEW_ID)
    new["emb"] = np.vstack([cat["emb"], q[None, :]])
    new["category"] = np.append(cat["category"], "c1")
    new["brand"] = np.append(cat["brand"], "brand-3")
    write_parquet(tmp / "items-v2.parquet", new)
    refresh_cli(tmp / "items-v2.parquet", root)
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "swapped", r.json()
    got = ask(handle, q, flt={"brand": ["brand-3"]}).json()
    assert got["index_version"] != old
    assert got["candidates"][0]["item_id"] == NEW_ID
    # the writes acknowledged before the refresh are folded into the new version
    if "hidden" in served:
        q2 = queries(cat, 1, seed=9)[0]
        ids = [c["item_id"] for c in ask(handle, q2, k=50).json()["candidates"]]
        assert served["hidden"] not in ids and served["deleted"] not in ids


def test_index_tune_on_the_root(served: dict[str, Any]) -> None:
    handle, cat, tmp, root = served["handle"], served["cat"], served["tmp"], served["root"]
    np.save(tmp / "q.npy", queries(cat, 300, seed=21))
    old = handle.retriever.holder.current().version
    assert main(["index", "tune", str(root), "--recall", "0.95", "--k", "100", "--queries", str(tmp / "q.npy")]) == 0
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
    b = handle.retriever.holder.current()
    assert b.version != old and b.vectors_only
    assert ask(handle, queries(cat, 1, seed=3)[0], flt={"brand": ["brand-1"]}).status_code == 200

"""Live item writes by vector on a vectors-only bundle, over real HTTP: POST /v1/items rows with `vector`.

A 6,000-item Parquet catalog (clustered unit vectors, dim 16, integer ids, a category and a "brand"
attribute) is published with `towerann refresh --vectors ... --space-id` as an HNSW bundle with
exact_below=0 (masked searches go through HNSW, not brute force) and served with no model. A new item
written by vector is the first answer for its own vector, with the category and brand it was written
with; a replaced vector moves its item; bad rows are one-line 400s that write nothing while the server
keeps serving; the writes survive a restart (replayed from the delta log) and a refresh from a new file
that does not hold them (folded into the new bundle). On a model bundle a vector row is a 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ann_catalog import AUTH, TOKEN, server_config

from towerann.cli import main
from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.server.server import ServerHandle, start_background
from towerann.serving.bundle import RetrievalBundle

N, DIM, CLUSTERS, K = 6_000, 16, 32, 20
BRANDS = [f"brand-{i}" for i in range(6)]
ID0 = 3_000_000
NEW_ID = 88_888_888  # written live, in no file
MOVED = ID0 + 5  # a catalog item whose vector is replaced live
SPACE = "shop-emb-v1"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_catalog(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLUSTERS, DIM))
    cluster = rng.integers(0, CLUSTERS, N)
    return {
        "sku": ID0 + np.arange(N, dtype=np.int64),
        "emb": _unit(centers[cluster] + 0.35 * rng.normal(size=(N, DIM))),
        "category": np.array([f"c{c % 4}" for c in cluster]),
        "brand": np.array(BRANDS)[rng.integers(0, len(BRANDS), N)],
    }


def write_parquet(path: Path, cat: dict[str, Any]) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(cat["emb"].reshape(-1)), DIM)
    pq.write_table(pa.table({"sku": cat["sku"], "emb": emb, "category": cat["category"], "brand": cat["brand"]}), path)


def refresh_cli(path: Path, root: Path) -> None:
    args = ["refresh", "--vectors", str(path), "--id-column", "sku", "--vector-column", "emb", "--space-id", SPACE]
    args += ["--category-column", "category", "--attributes", "brand", "--index", str(root)]
    args += ["--kind", "hnsw", "--recall", "0.95", "--k", "50", "--param", "exact_below=0"]
    assert main(args) == 0


def far(seed: int) -> np.ndarray:
    """A unit vector away from every cluster: its nearest catalog item is no close match."""
    return _unit(np.random.default_rng(seed).normal(size=DIM))


def vec(v: np.ndarray) -> list[float]:
    return [float(x) for x in v]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fixed_tuner_costs_module: None) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("vector-writes")
    cat = make_catalog(0)
    write_parquet(tmp / "items.parquet", cat)
    root = tmp / "indexes"
    refresh_cli(tmp / "items.parquet", root)
    (tmp / "token").write_text(TOKEN + "\n")
    cfg = Config(
        serve=ServeConfig(max_k=1000, max_body_bytes=1 << 20),
        paths=PathsConfig(index=str(root), model=str(tmp / "no-such-model")),
        features=FeaturesConfig(store="memory"),
        freshness=FreshnessConfig(token_file=str(tmp / "token"), poll_s=0.0),
    )
    state: dict[str, Any] = {"cfg": cfg, "cat": cat, "tmp": tmp, "root": root}
    state["handle"] = start_background(cfg)
    try:
        yield state
    finally:
        state["handle"].stop()


def current(handle: ServerHandle) -> RetrievalBundle:
    assert handle.retriever is not None
    return handle.retriever.holder.current()


def ask(handle: ServerHandle, q: np.ndarray, k: int = K, flt: dict[str, Any] | None = None) -> list[int]:
    body: dict[str, Any] = {"query_vector": vec(q), "k": k, **({"filter": flt} if flt else {})}
    r = httpx.post(f"{handle.url}/v1/candidates", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return [c["item_id"] for c in r.json()["candidates"]]


def post(handle: ServerHandle, rows: list[dict[str, Any]]) -> httpx.Response:
    # json.dumps spells a NaN or an infinity as JSON's common extension does (NaN, Infinity): a client may send them
    body = json.dumps({"items": rows})
    return httpx.post(f"{handle.url}/v1/items", content=body, headers={**AUTH, "content-type": "application/json"})


def check_writes(handle: ServerHandle, cat: dict[str, Any], old_moved: np.ndarray) -> None:
    """What the writes of test_new_item_by_vector / test_replaced_vector left, as the server answers now."""
    b = current(handle)
    assert b.index.kind == "hnsw" and "HNSW" in b.index.describe() and b.index.search_defaults["exact_below"] == 0
    assert ask(handle, far(1))[0] == NEW_ID
    assert ask(handle, far(1), flt={"brand": ["brand-new"]}) == [NEW_ID]  # a value born in the write
    assert ask(handle, far(1), flt={"categories": ["c-new"], "brand": ["brand-new"]}) == [NEW_ID]
    assert ask(handle, far(2))[0] == MOVED
    assert MOVED not in ask(handle, old_moved, k=100)
    # written without a brand: MOVED keeps the file's, and a filter on it (through HNSW's filtered path) finds it
    assert ask(handle, far(2), flt={"brand": [str(cat["brand"][MOVED - ID0])]})[0] == MOVED


def test_new_item_by_vector_is_found_first(served: dict[str, Any]) -> None:
    handle = served["handle"]
    q = far(1)
    assert NEW_ID not in ask(handle, q)
    row = {"item_id": NEW_ID, "category": "c-new", "brand": "brand-new", "vector": vec(q)}
    r = post(handle, [row])
    assert r.status_code == 200, r.text
    assert r.json()["upserted"] == 1
    got = httpx.post(f"{handle.url}/v1/candidates", json={"query_vector": vec(q), "k": K}, timeout=30).json()
    assert got["candidates"][0] == {"item_id": NEW_ID, "score": pytest.approx(1.0, abs=1e-4)}
    assert got["model_version"] == SPACE


def test_replaced_vector_moves_the_item(served: dict[str, Any]) -> None:
    handle, cat = served["handle"], served["cat"]
    old = cat["emb"][MOVED - ID0]
    assert ask(handle, old)[0] == MOVED
    r = post(handle, [{"item_id": str(MOVED), "category": str(cat["category"][MOVED - ID0]), "vector": vec(far(2))}])
    assert r.status_code == 200, r.text
    check_writes(handle, cat, old)


@pytest.mark.parametrize(
    "vector, message",
    [
        ([0.1] * (DIM - 1), "items[1].vector has 15 numbers; the served index has dim 16"),
        ([0.1] * (DIM - 1) + [float("nan")], "items[1].vector holds a NaN or infinite value"),
        ([float("inf")] + [0.1] * (DIM - 1), "items[1].vector holds a NaN or infinite value"),
        ([10**400] + [0.1] * (DIM - 1), "items[1].vector holds a NaN or infinite value"),  # beyond any float
        (["0.1"] * DIM, "items[1].vector must hold numbers only"),
        ([True] * DIM, "items[1].vector must hold numbers only"),
        ("0.1,0.2", "items[1].vector must be a list of 16 numbers"),
        ([0.0] * DIM, "items[1].vector: a vector of (near) zero norm"),
        (None, "items[1].vector: required: this bundle has no item tower"),
    ],
)
def test_bad_vector_rows_are_one_line_400s_that_write_nothing(
    served: dict[str, Any], vector: Any, message: str
) -> None:
    handle = served["handle"]
    writes = current(handle).delta_seq
    good = {"item_id": 77_777_777, "category": "c1", "vector": vec(far(3))}
    bad: dict[str, Any] = {"item_id": 77_777_778, "category": "c1"}
    if vector is not None:
        bad["vector"] = vector
    r = post(handle, [good, bad])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith(message) and "\n" not in error, error
    assert current(handle).delta_seq == writes  # nothing logged, nothing applied
    assert 77_777_777 not in ask(handle, far(3))  # the good row of the batch was not written either


def test_other_bad_rows_and_the_server_keeps_serving(served: dict[str, Any]) -> None:
    handle = served["handle"]
    cases: list[tuple[list[dict[str, Any]], str]] = [
        ([{"item_id": "5x", "category": "c1", "vector": vec(far(3))}], "items[0].item_id: this catalog's item ids"),
        ([{"item_id": 9, "vector": vec(far(3))}], "items[0].category: a non-empty string is required"),
        ([{"item_id": 9, "category": "c1", "vector": vec(far(3)), "price": 3}], "items[0]: unknown fields ['price']"),
        ([{"item_id": 9, "category": "c1", "vector": vec(far(3)), "brand": 7}], "items[0].brand: a string"),
    ]
    for rows, message in cases:
        r = post(handle, rows)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(message) and "\n" not in r.json()["error"], r.json()
    assert ask(handle, far(1))[0] == NEW_ID


def test_writes_survive_a_restart(served: dict[str, Any]) -> None:
    served["handle"].stop()
    served["handle"] = handle = start_background(served["cfg"])
    b = current(handle)
    assert b.delta_seq > 0 and b.holds(str(NEW_ID))  # replayed from the delta log
    check_writes(handle, served["cat"], served["cat"]["emb"][MOVED - ID0])


def test_refresh_from_a_new_file_keeps_the_writes(served: dict[str, Any]) -> None:
    handle, cat, tmp, root = served["handle"], served["cat"], served["tmp"], served["root"]
    old = current(handle).version
    new = make_catalog(0)  # the same items, with new vectors for every other one; NEW_ID is in neither file
    new["emb"][::2] = make_catalog(1)["emb"][::2]
    assert NEW_ID not in new["sku"].tolist()
    write_parquet(tmp / "items-v2.parquet", new)
    refresh_cli(tmp / "items-v2.parquet", root)
    folded = RetrievalBundle.load(root)  # in the new bundle itself, not only replayed by this server
    assert folded.holds(str(NEW_ID)) and folded.delta_seq == current(handle).delta_seq
    r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
    assert current(handle).version != old
    check_writes(handle, new, cat["emb"][MOVED - ID0])
    assert ask(handle, new["emb"][10])[0] == ID0 + 10  # the new file's vectors are served


def test_a_vector_row_on_a_model_bundle_is_a_400(tmp_path: Path, bundle_paths: dict[str, Path]) -> None:
    from towerann.freshness.deltalog import open_delta_log
    from towerann.freshness.live import replay
    from towerann.freshness.publish import publish_bundle

    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    handle = start_background(server_config(tmp_path, root, bundle_paths))
    try:
        r = post(handle, [{"item_id": 123456, "category": "c1", "vector": [0.1] * 32}])
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error.startswith("items[0].vector: this bundle's item tower") and "\n" not in error, error
        assert "send the item's features" in error
        assert httpx.get(f"{handle.url}/readyz", timeout=10).status_code == 200
    finally:
        handle.stop()
    # a vector logged while a vectors-only bundle was served is skipped on a model bundle, never fatal
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    seq = delta.append("upsert", "123456", {"item_id": "123456", "category": "c1", "vector": [0.1] * 32}).seq
    b = RetrievalBundle.load(root)
    assert replay(b, delta) == seq and not b.holds("123456")
    delta.close()

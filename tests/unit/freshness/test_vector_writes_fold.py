"""Vector writes on a vectors-only bundle: what `refresh --vectors` folds in, and what a replay applies.

A small Parquet catalog (string ids, category, a "brand" attribute) is published vectors-only (exact index:
these tests check what the bundle holds, the HTTP test checks HNSW); the delta log then holds vector
upserts (new items, a replaced vector, a new category and attribute value, an upsert after a delete),
availability changes, deletes and entries that cannot apply. A refresh from a new file folds them; a
replay applies the same entries to the bundle served before, with the same outcome.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.errors import BadRequest
from towerann.freshness.deltalog import DeltaLog, open_delta_log
from towerann.freshness.live import ItemWriter, replay
from towerann.freshness.refresh import refresh_vectors
from towerann.index import Filter
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder

N, DIM = 200, 8


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _file(path: Path, ids: list[str], seed: int = 0) -> np.ndarray:
    v = _unit(np.random.default_rng(seed).normal(size=(len(ids), DIM)))
    table = pa.table(
        {
            "sku": ids,
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM),
            "cat": [f"c{i % 3}" for i in range(len(ids))],
            "brand": [f"b{i % 4}" for i in range(len(ids))],
        }
    )
    pq.write_table(table, path)
    return v


def _publish(src: Path, root: Path, delta: DeltaLog, normalize: bool = False) -> RetrievalBundle:
    refresh_vectors(
        src,
        root,
        delta,
        id_column="sku",
        vector_column="emb",
        category_column="cat",
        attributes=("brand",),
        kind="exact",
        normalize=normalize,
        space_id="shop-v1",
    )
    return RetrievalBundle.load(root)


def _top(b: RetrievalBundle, q: np.ndarray, k: int = 5, flt: Filter | None = None) -> list[str]:
    ids = b.index.search(q[None, :], k, filter=flt).ids[0]
    return [str(b.external_ids[i]) for i in ids if i >= 0]


def _far(seed: int) -> np.ndarray:
    """A unit vector in a direction no catalog vector is close to (its own nearest item is itself)."""
    return _unit(np.random.default_rng(seed).normal(size=DIM) * 10)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    ids = [f"s{i}" for i in range(N)]
    v = _file(tmp_path / "v1.parquet", ids)
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    before = _publish(tmp_path / "v1.parquet", tmp_path / "root", delta)
    writer = ItemWriter(BundleHolder(before), delta)
    new_a, new_b, moved = _far(1), _far(2), _far(3)
    writer.upsert([{"item_id": "new-a", "category": "c-new", "brand": "b-new", "vector": new_a.tolist()}])
    writer.upsert([{"item_id": "new-b", "category": "c1", "vector": new_b.tolist()}])
    writer.set_available("new-b", False)
    writer.upsert([{"item_id": "s7", "category": "c0", "vector": moved.tolist()}])  # s7's vector replaced
    writer.delete("s8")
    writer.delete("s9")
    writer.upsert([{"item_id": "s9", "category": "c2", "vector": _far(4).tolist()}])  # back after its delete
    writer.set_available("s10", False)
    writer.upsert([{"item_id": "s11", "category": "c2", "brand": "b0", "vector": _far(7).tolist()}])  # was b3
    writer.upsert([{"item_id": "s12", "category": "c0", "brand": None, "vector": _far(8).tolist()}])  # cleared
    # entries no vectors-only bundle can apply (a hand-edited log, a model bundle's write): skipped
    delta.append("upsert", "bad-dim", {"item_id": "bad-dim", "category": "c0", "vector": [1.0, 2.0]})
    delta.append("upsert", "no-vec", {"item_id": "no-vec", "category": "c0", "price": 3.0})
    bad_attr = {"item_id": "bad-attr", "category": "c0", "brand": 7, "vector": _far(9).tolist()}
    delta.append("upsert", "bad-attr", bad_attr)
    return {"tmp": tmp_path, "v": v, "delta": delta, "served": before, "new_a": new_a, "new_b": new_b, "moved": moved}


def _check(b: RetrievalBundle, w: dict[str, Any]) -> None:
    """The outcome of the writes in `world`, on a folded or a replayed bundle alike."""
    assert _top(b, w["new_a"])[0] == "new-a"
    assert b.holds("new-b") and "new-b" not in _top(b, w["new_b"], k=N)  # held, but unavailable
    assert _top(b, w["moved"])[0] == "s7"
    assert "s7" not in _top(b, w["v"][7], k=20)  # its old vector is gone
    assert not b.holds("s8") and "s8" not in _top(b, w["v"][8], k=N)
    assert b.holds("s9") and _top(b, _far(4))[0] == "s9"
    assert b.holds("s10") and "s10" not in _top(b, w["v"][10], k=N)
    assert not b.holds("bad-dim") and not b.holds("no-vec") and not b.holds("bad-attr")

    def brand_of(item: str, q: np.ndarray) -> list[str]:
        return [x for x, code in b.attribute_code["brand"].items() if item in _top(b, q, k=N, flt=by_brand(code))]

    def by_brand(code: int) -> Filter:
        return Filter(attributes=(("brand", frozenset([code])),))

    # a new category and a new attribute value, given by the write, are filters like any other
    cat = Filter(categories=frozenset([b.category_code["c-new"]]))
    assert _top(b, w["moved"], flt=cat) == ["new-a"]
    brand = by_brand(b.attribute_code["brand"]["b-new"])
    assert _top(b, w["moved"], flt=brand) == ["new-a"]

    assert brand_of("s7", w["moved"]) == ["b3"]  # written without a brand: it keeps the file's
    assert brand_of("s11", _far(7)) == ["b0"]  # written with another one
    assert brand_of("s12", _far(8)) == [] and _top(b, _far(8))[0] == "s12"  # written with null: none


def test_refresh_from_a_new_file_folds_the_vector_writes(world: dict[str, Any]) -> None:
    tmp, delta = world["tmp"], world["delta"]
    _file(tmp / "v2.parquet", [f"s{i}" for i in range(N)])  # the new file: none of the written items changed
    b = _publish(tmp / "v2.parquet", tmp / "root", delta)
    assert b.delta_seq == delta.last_seq()  # folded into the bundle, not left to a replay
    assert b.model_version == "shop-v1" and b.vectors_only
    _check(b, world)


def test_replay_after_a_restart_gives_the_same_bundle(world: dict[str, Any]) -> None:
    served, delta = world["served"], world["delta"]
    _check(served, world)  # applied live
    fresh = RetrievalBundle.load(world["tmp"] / "root")  # the same bundle, as a restart loads it
    assert not fresh.holds("new-a")
    replay(fresh, delta)
    assert fresh.delta_seq == delta.last_seq()
    _check(fresh, world)


def test_refresh_normalizes_written_vectors_as_it_normalizes_the_file(tmp_path: Path) -> None:
    _file(tmp_path / "v.parquet", [f"s{i}" for i in range(N)])
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    b = _publish(tmp_path / "v.parquet", tmp_path / "root", delta, normalize=True)
    long = 5.0 * _far(5)
    ItemWriter(BundleHolder(b), delta).upsert([{"item_id": "long", "category": "c0", "vector": long.tolist()}])
    folded = _publish(tmp_path / "v.parquet", tmp_path / "root", delta, normalize=True)
    res = folded.index.search(_far(5)[None, :], 1)
    assert str(folded.external_ids[res.ids[0][0]]) == "long"
    assert res.scores[0][0] == pytest.approx(1.0, abs=1e-5)  # unit length now, as the file's vectors are
    unnormalized = _publish(tmp_path / "v.parquet", tmp_path / "root", delta)
    assert unnormalized.index.search(_far(5)[None, :], 1).scores[0][0] == pytest.approx(5.0, abs=1e-4)


def test_a_bad_row_writes_nothing(tmp_path: Path) -> None:
    _file(tmp_path / "v.parquet", [f"s{i}" for i in range(N)])
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    b = _publish(tmp_path / "v.parquet", tmp_path / "root", delta)
    writer = ItemWriter(BundleHolder(b), delta)
    good = {"item_id": "ok", "category": "c0", "vector": _far(6).tolist()}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"vector": [0.0] * DIM}, r"items\[1\]\.vector: a vector of \(near\) zero norm"),
        ({"vector": [1.0] * (DIM + 1)}, r"items\[1\]\.vector has 9 numbers; the served index has dim 8"),
        ({"vector": [1.0, "x"] + [1.0] * (DIM - 2)}, r"items\[1\]\.vector must hold numbers only"),
        ({"vector": [float("nan")] + [1.0] * (DIM - 1)}, r"items\[1\]\.vector holds a NaN or infinite value"),
        ({}, r"items\[1\]\.vector: required: this bundle has no item tower"),
    ]
    for bad, message in cases:
        with pytest.raises(BadRequest, match=message):
            writer.upsert([good, {"item_id": "bad", "category": "c0", **bad}])
    assert delta.last_seq() == 0 and not b.holds("ok")  # the good row of each batch was not written either

"""refresh_vectors: a vectors-only bundle from a Parquet file, with the delta log folded in and no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.errors import BadRequest
from towerann.freshness.deltalog import open_delta_log
from towerann.freshness.refresh import refresh_vectors
from towerann.freshness.reload import validation_recall
from towerann.index import Filter
from towerann.serving.bundle import RetrievalBundle

N, DIM = 300, 8


def _file(path: Path, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    table = pa.table(
        {
            "sku": [f"s{i}" for i in range(n)],
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM),
            "cat": [f"c{i % 3}" for i in range(n)],
            "brand": [None if i % 10 == 0 else f"b{i % 4}" for i in range(n)],
            "in_stock": [i % 2 == 0 for i in range(n)],
        }
    )
    pq.write_table(table, path)
    return v


def test_vectors_only_bundle_loads_without_a_model(tmp_path: Path) -> None:
    v = _file(tmp_path / "v.parquet")
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    delta.append("available", "s1", {"available": False})
    delta.append("delete", "s2", {})
    delta.append("upsert", "s9", {"item_id": "s9", "category": "c0"})  # no item tower: skipped
    out = refresh_vectors(
        tmp_path / "v.parquet",
        tmp_path / "root",
        delta,
        id_column="sku",
        vector_column="emb",
        category_column="cat",
        attributes=("brand", "in_stock"),
        kind="exact",
    )
    assert out["delta_seq"] == 3 and out["items"] == N - 1
    b = RetrievalBundle.load(tmp_path / "root", model_dir=tmp_path / "ignored")
    assert b.vectors_only and b.model_version.startswith("external-") and b.delta_seq == 3
    assert b.attribute_values == {"brand": ["b0", "b1", "b2", "b3"], "in_stock": ["false", "true"]}
    assert b.validation_queries is not None and b.validation_queries.shape[1] == DIM
    assert validation_recall(b) == 1.0
    assert not b.holds("s2") and b.holds("s1")
    res = b.index.search(v[1:2], N).ids[0]
    assert b.item_internal.get("s1") not in res.tolist()  # unavailable, folded from the log
    code = b.attribute_code["brand"]["b1"]
    got = b.index.search(v[:1], 20, filter=Filter(attributes=(("brand", frozenset([code])),))).ids[0]
    assert all(str(b.external_ids[i]) in {f"s{j}" for j in range(1, N, 4)} for i in got if i >= 0)
    with pytest.raises(BadRequest, match="no user tower"):
        b.encoder.encode("u", {}, [])
    with pytest.raises(BadRequest, match="no item tower"):
        b.model.schema  # noqa: B018  # the stand-in for the absent item tower: 400 on use
    far = 100 * v[:1]  # scores 100x any catalog item for the query far itself
    b.upsert([{"item_id": "new", "category": "c0"}], far)  # an item is its vector here: no tower asked
    assert b.holds("new") and b.index.search(far, 1).ids[0][0] == b.item_internal.get("new")


def test_refresh_without_vectors_on_a_vectors_only_root_says_what_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from towerann.cli import main

    _file(tmp_path / "v.parquet")
    root = tmp_path / "root"
    args = ["refresh", "--index", str(root), "--kind", "exact", "--vector-column", "emb", "--id-column", "sku"]
    assert main([*args, "--vectors", str(tmp_path / "v.parquet"), "--space-id", "shop-emb-v1"]) == 0
    assert RetrievalBundle.load(root).model_version == "shop-emb-v1"
    assert main(["refresh", "--index", str(root)]) == 2
    assert "vectors-only" in capsys.readouterr().err

"""The dataset layout: validation, readers, feature typing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.data.dataset import (
    feature_columns,
    iter_item_batches,
    read_interactions,
    read_items,
    read_users,
    validate_dataset,
    write_dataset,
    write_manifest,
)
from towerann.errors import DataError


def frames(id_kind: str = "int") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ids = np.arange(10, dtype=np.int64)
    item_ids = ids if id_kind == "int" else [f"i{i}" for i in ids]
    user_ids = ids[:4] if id_kind == "int" else [f"u{i}" for i in ids[:4]]
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category": ["a", "b"] * 5,
            "available": [True] * 9 + [False],
            "price": np.linspace(1, 10, 10).astype(np.float32),
            "brand": ["x"] * 10,
        }
    )
    users = pd.DataFrame({"user_id": user_ids, "age": np.array([20, 30, 40, 50], np.float32), "country": list("ABCD")})
    inter = pd.DataFrame(
        {
            "user_id": [user_ids[0], user_ids[0], user_ids[1]],
            "item_id": [item_ids[1], item_ids[2], item_ids[3]],
            "timestamp": np.array([1, 2, 3], np.int64),
            "weight": np.array([1, 2, 3], np.float32),
        }
    )
    return items, users, inter


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds", *frames(), source="test")


def rewrite(path: Path, name: str, frame: pd.DataFrame) -> None:
    """Replace one file and refresh the manifest, as a hand-made dataset would be."""
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path / name)
    write_manifest(path, "test")


def test_valid_dataset_summary(dataset: Path) -> None:
    info = validate_dataset(dataset, verify_checksums=True)
    assert info["counts"] == {"items": 10, "users": 4, "interactions": 3}
    assert info["item_numeric"] == ["price"] and info["item_categorical"] == ["brand"]
    assert info["user_numeric"] == ["age"] and info["user_categorical"] == ["country"]
    assert info["item_id_kind"] == "int" and info["has_weight"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["kind"] == "dataset" and manifest["format_version"] == 1
    assert manifest["files"]["items.parquet"]["columns"] == ["item_id", "category", "available", "price", "brand"]


def test_string_ids_are_accepted(tmp_path: Path) -> None:
    path = write_dataset(tmp_path / "s", *frames("str"), source="test")
    info = validate_dataset(path)
    assert info["item_id_kind"] == "str" and info["user_id_kind"] == "str"
    assert list(read_interactions(path)["item_id"]) == ["i1", "i2", "i3"]


def test_missing_column_is_refused(dataset: Path) -> None:
    items = read_items(dataset).drop(columns=["category"])
    rewrite(dataset, "items.parquet", items)
    with pytest.raises(DataError, match=r"items\.parquet.*'category' is missing"):
        validate_dataset(dataset)


def test_write_dataset_refuses_bad_frames_and_leaves_nothing(tmp_path: Path) -> None:
    items, users, inter = frames()
    with pytest.raises(DataError, match="available"):
        write_dataset(tmp_path / "bad", items.drop(columns=["available"]), users, inter, source="test")
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name,change,message",
    [
        (
            "interactions.parquet",
            lambda f: f.assign(timestamp=f["timestamp"].astype(str)),
            r"'timestamp' has type (large_)?string; expected int64",
        ),
        (
            "items.parquet",
            lambda f: f.assign(stock=np.arange(10, dtype=np.int32)),
            r"feature column 'stock' has type int32",
        ),
        ("items.parquet", lambda f: f.assign(available=1), r"'available' has type int64; expected bool"),
        (
            "users.parquet",
            lambda f: f.assign(user_id=f["user_id"].astype(str)),
            r"interactions\.parquet: user_id is int64 but users\.parquet has str",
        ),
        (
            "interactions.parquet",
            lambda f: f.assign(weight=f["weight"].astype(str)),
            r"'weight' has type (large_)?string",
        ),
        (
            "items.parquet",
            lambda f: f.assign(item_id=f["item_id"].astype(np.int32)),
            r"'item_id' has type int32; expected int64 or string",
        ),
    ],
)
def test_wrong_dtypes_are_refused(dataset: Path, name: str, change, message: str) -> None:
    reader = {"items.parquet": read_items, "users.parquet": read_users, "interactions.parquet": read_interactions}[name]
    rewrite(dataset, name, change(reader(dataset)))
    with pytest.raises(DataError, match=message):
        validate_dataset(dataset)


def test_null_ids_are_refused(dataset: Path) -> None:
    inter = read_interactions(dataset)
    table = pa.Table.from_pandas(inter, preserve_index=False)
    table = table.set_column(1, "item_id", pa.array([1, None, 3], pa.int64()))
    pq.write_table(table, dataset / "interactions.parquet")
    write_manifest(dataset, "test")
    with pytest.raises(DataError, match=r"interactions\.parquet: column 'item_id' has 1 null"):
        validate_dataset(dataset)


def test_missing_file_and_manifest(dataset: Path, tmp_path: Path) -> None:
    (dataset / "users.parquet").unlink()
    with pytest.raises(DataError, match=r"users\.parquet: missing"):
        validate_dataset(dataset)
    with pytest.raises(DataError, match="not a dataset directory"):
        read_items(tmp_path / "nope")
    other = write_dataset(tmp_path / "other", *frames(), source="test")
    (other / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json: missing"):
        validate_dataset(other)


def test_replaced_file_is_detected(dataset: Path) -> None:
    items = read_items(dataset)
    pq.write_table(pa.Table.from_pandas(items.iloc[:5], preserve_index=False), dataset / "items.parquet")
    with pytest.raises(DataError, match="do not match the Parquet files"):
        validate_dataset(dataset)


def test_corrupt_parquet_is_a_data_error(dataset: Path) -> None:
    (dataset / "items.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"items\.parquet: not a readable Parquet file"):
        validate_dataset(dataset)


def test_readers_and_batches(dataset: Path) -> None:
    assert list(read_items(dataset, columns=["item_id", "price"]).columns) == ["item_id", "price"]
    with pytest.raises(DataError, match=r"items\.parquet: no column\(s\) \['colour'\]"):
        read_items(dataset, columns=["colour"])
    batches = list(iter_item_batches(dataset, batch_size=4, columns=["item_id"]))
    assert [b.num_rows for b in batches] == [4, 4, 2]
    assert np.concatenate([b.column(0).to_numpy() for b in batches]).tolist() == list(range(10))
    direct = list(iter_item_batches(dataset / "items.parquet", batch_size=100))
    assert sum(b.num_rows for b in direct) == 10 and direct[0].schema.names[0] == "item_id"
    assert read_users(dataset)["country"].tolist() == list("ABCD")
    assert read_interactions(dataset)["weight"].dtype == np.float32


def test_feature_columns_by_dtype() -> None:
    schema = pa.schema(
        [
            ("item_id", pa.int64()),
            ("category", pa.string()),
            ("available", pa.bool_()),
            ("price", pa.float32()),
            ("score", pa.float64()),
            ("brand", pa.string()),
            ("colour", pa.dictionary(pa.int32(), pa.string())),
            ("stock", pa.int32()),
        ]
    )
    numeric, categorical = feature_columns(schema, {"item_id", "category", "available"})
    assert numeric == ["price", "score"]
    assert categorical == ["brand", "colour"]


def test_batches_check_input_before_iterating(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"items\.parquet: missing"):
        iter_item_batches(tmp_path)  # no iteration needed to see the error
    with pytest.raises(DataError, match=r"no column\(s\) \['nope'\]"):
        iter_item_batches(dataset, columns=["nope"])

"""Feature schema: how catalog and user columns become tower inputs.

Built once from the training dataset and saved with the model, so that training, batch
embedding and serving encode features the same way. Index 0 of every vocabulary is the
out-of-vocabulary bucket: unknown users, new items and unseen values are encoded as 0 and
handled by the towers (the cold-start path), never rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

ITEM_RESERVED = {"item_id", "category", "available"}
USER_RESERVED = {"user_id"}
MAX_CATEGORICAL_VOCAB = 10_000


@dataclass
class NumericColumn:
    name: str
    mean: float
    std: float


@dataclass
class CategoricalColumn:
    name: str
    values: list[str]  # index i+1 <-> values[i]; 0 is OOV
    _lookup: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._lookup = {v: i + 1 for i, v in enumerate(self.values)}

    def encode(self, values: Sequence[Any] | pd.Series) -> np.ndarray:
        lookup = self._lookup
        return np.fromiter((lookup.get(str(v), 0) for v in values), dtype=np.int64, count=len(values))

    def encode_one(self, value: Any) -> int:
        return self._lookup.get(str(value), 0)

    @property
    def size(self) -> int:
        return len(self.values) + 1


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def _is_categorical(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _numeric(df: pd.DataFrame, name: str) -> NumericColumn:
    col = df[name].astype("float64")
    std = float(col.std()) if len(col) > 1 else 1.0
    return NumericColumn(name, float(np.nan_to_num(col.mean())), std if std > 1e-9 and np.isfinite(std) else 1.0)


def _categorical(df: pd.DataFrame, name: str) -> CategoricalColumn:
    counts = df[name].astype(str).value_counts()
    return CategoricalColumn(name, [str(v) for v in counts.index[:MAX_CATEGORICAL_VOCAB]])


@dataclass
class FeatureSchema:
    """Everything needed to turn raw rows into tower inputs (saved in the model manifest)."""

    categories: CategoricalColumn
    item_numeric: list[NumericColumn]
    item_categorical: list[CategoricalColumn]
    user_numeric: list[NumericColumn]
    user_categorical: list[CategoricalColumn]
    history_len: int
    item_id_kind: str  # "int" or "str": how external item ids are typed in the catalog
    user_id_kind: str

    @classmethod
    def from_frames(cls, items: pd.DataFrame, users: pd.DataFrame, history_len: int) -> "FeatureSchema":
        item_schema = pa.Schema.from_pandas(items, preserve_index=False)
        user_schema = pa.Schema.from_pandas(users, preserve_index=False)
        item_num = [f.name for f in item_schema if f.name not in ITEM_RESERVED and _is_numeric(f.type)]
        item_cat = [f.name for f in item_schema if f.name not in ITEM_RESERVED and _is_categorical(f.type)]
        user_num = [f.name for f in user_schema if f.name not in USER_RESERVED and _is_numeric(f.type)]
        user_cat = [f.name for f in user_schema if f.name not in USER_RESERVED and _is_categorical(f.type)]
        return cls(
            categories=_categorical(items, "category"),
            item_numeric=[_numeric(items, c) for c in item_num],
            item_categorical=[_categorical(items, c) for c in item_cat],
            user_numeric=[_numeric(users, c) for c in user_num],
            user_categorical=[_categorical(users, c) for c in user_cat],
            history_len=history_len,
            item_id_kind="int" if pd.api.types.is_integer_dtype(items["item_id"]) else "str",
            user_id_kind="int" if pd.api.types.is_integer_dtype(users["user_id"]) else "str",
        )

    # --- encoding -------------------------------------------------------------------------

    def encode_item_features(self, frame: pd.DataFrame | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Catalog rows -> (category idx [n], numeric f32 [n, a], categorical idx [n, b])."""
        if isinstance(frame, pa.RecordBatch):
            frame = frame.to_pandas()
        cat = self.categories.encode(frame["category"].to_numpy())
        num = _standardise(frame, self.item_numeric)
        cats = np.stack([c.encode(frame[c.name].to_numpy()) for c in self.item_categorical], axis=1) \
            if self.item_categorical else np.zeros((len(frame), 0), np.int64)
        return cat, num, cats

    def encode_user_static(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Static feature dicts (missing keys allowed) -> (numeric f32 [n, a], categorical idx [n, b])."""
        num = np.zeros((len(rows), len(self.user_numeric)), np.float32)
        cats = np.zeros((len(rows), len(self.user_categorical)), np.int64)
        for r, row in enumerate(rows):
            for j, c in enumerate(self.user_numeric):
                v = row.get(c.name)
                num[r, j] = 0.0 if v is None or v != v else (float(v) - c.mean) / c.std
            for j, c in enumerate(self.user_categorical):
                v = row.get(c.name)
                cats[r, j] = 0 if v is None else c.encode_one(v)
        return num, cats

    def encode_user_frame(self, users: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        num = _standardise(users, self.user_numeric)
        cats = np.stack([c.encode(users[c.name].to_numpy()) for c in self.user_categorical], axis=1) \
            if self.user_categorical else np.zeros((len(users), 0), np.int64)
        return num, cats

    # --- JSON -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def cat(c: CategoricalColumn) -> dict[str, Any]:
            return {"name": c.name, "values": c.values}

        def num(c: NumericColumn) -> dict[str, Any]:
            return {"name": c.name, "mean": c.mean, "std": c.std}

        return {
            "categories": self.categories.values,
            "item_numeric": [num(c) for c in self.item_numeric],
            "item_categorical": [cat(c) for c in self.item_categorical],
            "user_numeric": [num(c) for c in self.user_numeric],
            "user_categorical": [cat(c) for c in self.user_categorical],
            "history_len": self.history_len,
            "item_id_kind": self.item_id_kind,
            "user_id_kind": self.user_id_kind,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FeatureSchema":
        return cls(
            categories=CategoricalColumn("category", list(d["categories"])),
            item_numeric=[NumericColumn(c["name"], c["mean"], c["std"]) for c in d["item_numeric"]],
            item_categorical=[CategoricalColumn(c["name"], c["values"]) for c in d["item_categorical"]],
            user_numeric=[NumericColumn(c["name"], c["mean"], c["std"]) for c in d["user_numeric"]],
            user_categorical=[CategoricalColumn(c["name"], c["values"]) for c in d["user_categorical"]],
            history_len=int(d["history_len"]),
            item_id_kind=d["item_id_kind"],
            user_id_kind=d["user_id_kind"],
        )


def _standardise(frame: pd.DataFrame, columns: list[NumericColumn]) -> np.ndarray:
    if not columns:
        return np.zeros((len(frame), 0), np.float32)
    out = np.empty((len(frame), len(columns)), np.float32)
    for j, c in enumerate(columns):
        v = frame[c.name].to_numpy(dtype=np.float64, na_value=np.nan)
        out[:, j] = np.nan_to_num((v - c.mean) / c.std)
    return out

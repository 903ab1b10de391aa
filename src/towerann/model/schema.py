"""Feature schema: how catalog and user columns become tower inputs.

Built once from the training dataset and saved with the model, so that training, batch
embedding and serving encode features the same way. Index 0 of every vocabulary is the
out-of-vocabulary bucket: unknown users, new items and unseen values are encoded as 0 and
handled by the towers (the cold-start path), never rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towerann.data.dataset import ITEM_KEY_COLUMNS, ITEM_RESERVED, USER_RESERVED, feature_columns

MAX_CATEGORICAL_VOCAB = 10_000
Columns: TypeAlias = pd.DataFrame | pa.RecordBatch | pa.Table


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

    def encode_arrow(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """An Arrow column -> int64 codes, looking up each distinct value once (no Python call per row)."""
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if not pa.types.is_dictionary(arr.type):
            arr = pc.dictionary_encode(arr)
        dict_codes = self.encode(arr.dictionary.to_pylist())  # str(v) lookups, as encode() does
        idx = arr.indices
        if idx.null_count:  # a null is looked up as str(None), as encode() would
            idx = idx.fill_null(len(dict_codes))
            dict_codes = np.append(dict_codes, self.encode_one(None))
        return dict_codes[idx.to_numpy(zero_copy_only=False)]

    @property
    def size(self) -> int:
        return len(self.values) + 1

    @classmethod
    def from_frame(cls, df: pd.DataFrame, name: str) -> CategoricalColumn:
        """Column `name`'s vocabulary: its values as strings, most frequent first, at most MAX_CATEGORICAL_VOCAB."""
        counts = df[name].astype(str).value_counts()
        return cls(name, [str(v) for v in counts.index[:MAX_CATEGORICAL_VOCAB]])


def _numeric(df: pd.DataFrame, name: str) -> NumericColumn:
    col = df[name].astype("float64")
    std = float(col.std()) if len(col) > 1 else 1.0
    return NumericColumn(name, float(np.nan_to_num(col.mean())), std if std > 1e-9 and np.isfinite(std) else 1.0)


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
    def from_frames(cls, items: pd.DataFrame, users: pd.DataFrame, history_len: int) -> FeatureSchema:
        item_num, item_cat = feature_columns(pa.Schema.from_pandas(items, preserve_index=False), ITEM_RESERVED)
        user_num, user_cat = feature_columns(pa.Schema.from_pandas(users, preserve_index=False), USER_RESERVED)
        return cls(
            categories=CategoricalColumn.from_frame(items, "category"),
            item_numeric=[_numeric(items, c) for c in item_num],
            item_categorical=[CategoricalColumn.from_frame(items, c) for c in item_cat],
            user_numeric=[_numeric(users, c) for c in user_num],
            user_categorical=[CategoricalColumn.from_frame(users, c) for c in user_cat],
            history_len=history_len,
            item_id_kind="int" if pd.api.types.is_integer_dtype(items["item_id"]) else "str",
            user_id_kind="int" if pd.api.types.is_integer_dtype(users["user_id"]) else "str",
        )

    # --- columns and encoding -------------------------------------------------------------

    def item_feature_names(self) -> tuple[list[str], list[str]]:
        """The item tower's feature columns: (numeric, categorical)."""
        return [c.name for c in self.item_numeric], [c.name for c in self.item_categorical]

    def item_columns(self) -> list[str]:
        """Every catalog column the item side reads: ids, category, availability, then the features."""
        numeric, categorical = self.item_feature_names()
        return [*ITEM_KEY_COLUMNS, *numeric, *categorical]

    def encode_item_features(self, frame: Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Catalog rows (pandas or Arrow) -> (category idx [n], numeric f32 [n, a], categorical idx [n, b]).

        The one item encoder: training, batch embedding and live item writes all come through here."""
        cols = _arrow_columns(
            frame, ["category", *(c.name for c in self.item_numeric), *(c.name for c in self.item_categorical)]
        )
        cat = self.categories.encode_arrow(cols["category"])
        num = _standardise(cols, self.item_numeric, len(cat))
        cats = _stack_codes(cols, self.item_categorical, len(cat))
        return cat, num, cats

    def encode_user_static(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Static feature dicts (missing keys allowed) -> (numeric f32 [n, a], categorical idx [n, b])."""
        num = np.zeros((len(rows), len(self.user_numeric)), np.float32)
        cats = np.zeros((len(rows), len(self.user_categorical)), np.int64)
        for r, row in enumerate(rows):
            for j, c in enumerate(self.user_numeric):
                v = row.get(c.name)
                num[r, j] = 0.0 if v is None or v != v else (float(v) - c.mean) / c.std
            for j, cc in enumerate(self.user_categorical):
                v = row.get(cc.name)
                cats[r, j] = 0 if v is None else cc.encode_one(v)
        return num, cats

    def encode_user_frame(self, users: Columns) -> tuple[np.ndarray, np.ndarray]:
        """User rows (pandas or Arrow) -> (numeric f32 [n, a], categorical idx [n, b])."""
        cols = _arrow_columns(users, [*(c.name for c in self.user_numeric), *(c.name for c in self.user_categorical)])
        n = len(users) if isinstance(users, pd.DataFrame) else users.num_rows
        return _standardise(cols, self.user_numeric, n), _stack_codes(cols, self.user_categorical, n)

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
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSchema:
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


def _arrow_columns(frame: Columns, names: list[str]) -> dict[str, pa.Array | pa.ChunkedArray]:
    if isinstance(frame, pd.DataFrame):
        return {n: pa.array(frame[n], from_pandas=True) for n in names}
    return {n: frame.column(n) for n in names}


def standardise(values: pa.Array | pa.ChunkedArray, col: NumericColumn) -> np.ndarray:
    """Raw numbers -> z-scores by the training statistics; a null (or NaN) becomes 0, the mean."""
    v = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls come back as NaN
    return np.nan_to_num((v - col.mean) / col.std)


def _standardise(cols: dict[str, Any], columns: list[NumericColumn], n: int) -> np.ndarray:
    out = np.empty((n, len(columns)), np.float32)
    for j, c in enumerate(columns):
        out[:, j] = standardise(cols[c.name], c)
    return out


def _stack_codes(cols: dict[str, Any], columns: list[CategoricalColumn], n: int) -> np.ndarray:
    out = np.empty((n, len(columns)), np.int64)
    for j, c in enumerate(columns):
        out[:, j] = c.encode_arrow(cols[c.name])
    return out

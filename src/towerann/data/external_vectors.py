"""Item vectors made elsewhere (another training stack's item tower) -> a towerann vectors directory.

`import_vectors` (behind `towerann index build --vectors FILE` and `towerann refresh --vectors FILE`)
reads a Parquet file with an id column and a vector column (list or fixed-size list of floats), or a
.npy matrix with a .npy of ids, plus optional category and availability columns, checks it (one dim,
finite values, unique ids) and writes the same vectors directory `towerann embed` writes, so
`towerann index build` and everything after it work unchanged. The vectors are taken as they are
(inner product); `normalize` L2-normalises them first (cosine).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from towerann.artifacts import sha256_file
from towerann.data.vectors_dir import UNKNOWN_CATEGORY, write_vectors
from towerann.errors import DataError

UNKNOWN = UNKNOWN_CATEGORY


class ExternalVectors(TypedDict):
    """An external vector file's arrays, checked (read_external)."""

    vectors: np.ndarray  # f32 [n, dim]
    external_ids: np.ndarray  # int64 or str [n]
    categories: np.ndarray  # int32 codes [n] into category_names (0: unknown)
    available: np.ndarray  # bool [n]
    category_names: list[str]
    model_version: str  # "external-" + the files' checksums


def _vectors_from_column(col: pa.ChunkedArray, file: Path, name: str) -> np.ndarray:
    col = col.combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise DataError(f"{file}: column {name!r} has type {col.type}; expected a list of floats per row")
    if col.null_count:
        raise DataError(f"{file}: column {name!r} has {col.null_count} null vector(s)")
    lengths = np.asarray(pc.list_value_length(col))
    if len(lengths) and (lengths.min() != lengths.max() or lengths[0] == 0):
        raise DataError(
            f"{file}: column {name!r} holds vectors of different lengths "
            f"({int(lengths.min())} to {int(lengths.max())}); every item needs the same dim"
        )
    flat = np.asarray(pc.list_flatten(col).cast(pa.float32()), dtype=np.float32)
    dim = int(lengths[0]) if len(lengths) else 0
    return flat.reshape(len(col), dim)


def read_external(
    source: str | Path,
    ids: str | Path | None = None,
    id_column: str = "item_id",
    vector_column: str = "vector",
    category_column: str | None = None,
    available_column: str | None = None,
) -> ExternalVectors:
    """The arrays of an external vector file, checked: vectors, external_ids, categories, available, names."""
    file = Path(source)
    if not file.is_file():
        raise DataError(f"{file}: no such file (give a .parquet file, or a .npy matrix with --ids)")
    if file.suffix == ".npy":
        if ids is None or category_column or available_column:
            raise DataError(f"{file}: a .npy matrix needs --ids IDS.npy (and takes no category/availability columns)")
        vectors = np.load(file, allow_pickle=False)
        external = np.load(ids, allow_pickle=False)
        files = [file, Path(ids)]
        if vectors.ndim != 2:
            raise DataError(f"{file}: expected a [n, dim] matrix, got shape {vectors.shape}")
        vectors = vectors.astype(np.float32, copy=False)
        categories: np.ndarray | None = None
        available = np.ones(len(vectors), bool)
    else:
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: not a readable Parquet file ({e})") from e
        wanted = [c for c in (id_column, vector_column, category_column, available_column) if c]
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise DataError(f"{file}: no column(s) {missing}; it has {table.column_names}")
        vectors = _vectors_from_column(table.column(vector_column), file, vector_column)
        external = table.column(id_column).to_numpy(zero_copy_only=False)
        categories = (
            table.column(category_column).cast(pa.string()).fill_null(UNKNOWN).to_numpy(zero_copy_only=False)
            if category_column
            else None
        )
        available = (
            table.column(available_column).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
            if available_column
            else np.ones(len(vectors), bool)
        )
        files = [file]
    if external.dtype.kind in "iu":
        external = external.astype(np.int64)
    elif external.dtype.kind in "OUS":
        external = external.astype(str)
    else:
        raise DataError(f"{file}: ids must be integers or strings, got {external.dtype}")
    if len(external) != len(vectors):
        raise DataError(f"{file}: {len(vectors)} vectors but {len(external)} ids")
    if len(vectors) == 0:
        raise DataError(f"{file}: no vectors")
    if len(np.unique(external)) != len(external):
        raise DataError(f"{file}: item ids are not unique")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise DataError(
            f"{file}: {int(bad.sum())} vector(s) hold NaN or infinite values (first: item {external[np.argmax(bad)]!r})"
        )
    names = [UNKNOWN] + sorted(set(categories.tolist()) - {UNKNOWN}) if categories is not None else [UNKNOWN]
    codes = (
        np.searchsorted(np.asarray(names[1:]), categories).astype(np.int32) + 1
        if categories is not None
        else np.zeros(len(vectors), np.int32)
    )
    if categories is not None:
        codes[categories == UNKNOWN] = 0
    return {
        "vectors": vectors,
        "external_ids": external,
        "categories": codes,
        "available": available,
        "category_names": names,
        "model_version": "external-" + "-".join(sha256_file(f)[:12] for f in files),
    }


def import_vectors(
    source: str | Path,
    out: str | Path,
    ids: str | Path | None = None,
    id_column: str = "item_id",
    vector_column: str = "vector",
    category_column: str | None = None,
    available_column: str | None = None,
    normalize: bool = False,
    overwrite: bool = False,
) -> Path:
    got = read_external(source, ids, id_column, vector_column, category_column, available_column)
    vectors = got["vectors"]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise DataError(f"{source}: {int((norms == 0).sum())} zero vector(s) cannot be normalised")
        vectors = vectors / norms
    n = len(vectors)
    return write_vectors(
        out,
        vectors,
        np.arange(n, dtype=np.int64),
        got["categories"],
        got["available"],
        got["category_names"],
        got["model_version"],
        got["external_ids"],
        overwrite=overwrite,
    )

"""The on-disk dataset layout, its readers and its one writer.

A dataset is a directory with `items.parquet`, `users.parquet`, `interactions.parquet` and a
`manifest.json` (kind "dataset"). Feature columns are typed by dtype alone: float columns are
numeric features, string columns categorical ones, so every producer (the generator, the
MovieLens converter, a user's own export) is read the same way by the model and the embedder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from towerann import artifacts
from towerann.artifacts import MANIFEST, atomic_dir, read_manifest, sha256_file
from towerann.errors import ArtifactError, DataError

log = logging.getLogger(__name__)

KIND = "dataset"
FORMAT_VERSION = 1
ITEMS, USERS, INTERACTIONS = "items.parquet", "users.parquet", "interactions.parquet"
# The catalog schema, for every producer and reader (data, model, embed, freshness): these columns
# are not tower features; every other float column is a numeric feature, every string one categorical.
ITEM_KEY_COLUMNS = ("item_id", "category", "available")
ITEM_RESERVED = frozenset(ITEM_KEY_COLUMNS)
USER_RESERVED = frozenset({"user_id"})
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t)


def _id_kind(t: pa.DataType) -> str | None:
    """ "int" for int64 ids, "str" for string ids, None for anything else."""
    if pa.types.is_int64(t):
        return "int"
    return "str" if _is_string(t) else None


def feature_columns(schema: pa.Schema, reserved: set[str] | frozenset[str]) -> tuple[list[str], list[str]]:
    """(numeric, categorical) feature columns of `schema`: float -> numeric, string -> categorical."""
    numeric = [f.name for f in schema if f.name not in reserved and _is_float(f.type)]
    categorical = [f.name for f in schema if f.name not in reserved and _is_string(f.type)]
    return numeric, categorical


def _dataset_file(path: str | Path, name: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(
            f"{directory}: not a dataset directory (expected {ITEMS}, {USERS}, {INTERACTIONS}, {MANIFEST}); "
            "create one with `towerann data synth` or `towerann data movielens`"
        )
    file = directory / name
    if not file.is_file():
        raise DataError(f"{file}: missing; a dataset directory needs {ITEMS}, {USERS} and {INTERACTIONS}")
    return file


def _parquet_file(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a readable Parquet file ({e})") from e


def _check_columns(file: Path, schema: pa.Schema, columns: list[str] | None) -> None:
    if columns is None:
        return
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{file}: no column(s) {missing}; it has {schema.names}")


def _null_count(meta: pq.FileMetaData, column: str) -> int:
    """Nulls in `column` by the Parquet statistics (0 where a writer left none)."""
    idx = meta.schema.names.index(column) if column in meta.schema.names else -1
    total = 0
    if idx < 0:
        return 0
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(idx).statistics
        if stats is not None and stats.has_null_count:
            total += stats.null_count
    return total


def _require(file: Path, schema: pa.Schema, name: str, ok: Any, want: str) -> pa.DataType:
    if name not in schema.names:
        raise DataError(f"{file}: required column '{name}' is missing (expected {want}); it has {schema.names}")
    t = schema.field(name).type
    if not ok(t):
        raise DataError(f"{file}: column '{name}' has type {t}; expected {want} - cast it and rewrite the file")
    return t


def _check_features(file: Path, schema: pa.Schema, reserved: frozenset[str]) -> tuple[list[str], list[str]]:
    for f in schema:
        if f.name not in reserved and not (_is_float(f.type) or _is_string(f.type)):
            raise DataError(
                f"{file}: feature column '{f.name}' has type {f.type}; feature columns must be float "
                "(numeric) or string (categorical) - cast it, or drop it"
            )
    return feature_columns(schema, reserved)


def _check_no_nulls(file: Path, meta: pq.FileMetaData, columns: tuple[str, ...]) -> None:
    for c in columns:
        n = _null_count(meta, c)
        if n:
            raise DataError(f"{file}: column '{c}' has {n} null value(s); fill or drop those rows")


def validate_dataset(path: str | Path, verify_checksums: bool = False) -> dict[str, Any]:
    """Check a dataset directory (files, manifest, required columns and dtypes) from metadata only.

    Returns a summary: the manifest, the id kinds and the feature columns of items and users.
    Raises DataError naming the file and the problem; ArtifactError for a bad manifest.
    """
    directory = Path(path)
    files = {name: _dataset_file(directory, name) for name in (ITEMS, USERS, INTERACTIONS)}
    try:
        manifest = read_manifest(directory, KIND, FORMAT_VERSION)
    except ArtifactError as e:
        raise DataError(str(e)) from e
    metas = {name: _parquet_file(f).metadata for name, f in files.items()}
    schemas = {name: m.schema.to_arrow_schema() for name, m in metas.items()}

    f, s = files[ITEMS], schemas[ITEMS]
    item_kind = _id_kind(_require(f, s, "item_id", _id_kind, "int64 or string"))
    _require(f, s, "category", _is_string, "string")
    _require(f, s, "available", pa.types.is_boolean, "bool")
    item_numeric, item_categorical = _check_features(f, s, ITEM_RESERVED)
    _check_no_nulls(f, metas[ITEMS], ("item_id", "category", "available"))

    f, s = files[USERS], schemas[USERS]
    user_kind = _id_kind(_require(f, s, "user_id", _id_kind, "int64 or string"))
    user_numeric, user_categorical = _check_features(f, s, USER_RESERVED)
    _check_no_nulls(f, metas[USERS], ("user_id",))

    f, s = files[INTERACTIONS], schemas[INTERACTIONS]
    t = _require(f, s, "user_id", _id_kind, "int64 or string")
    if _id_kind(t) != user_kind:
        raise DataError(
            f"{f}: user_id is {t} but {files[USERS].name} has {user_kind} user ids; use one id type in both"
        )
    t = _require(f, s, "item_id", _id_kind, "int64 or string")
    if _id_kind(t) != item_kind:
        raise DataError(
            f"{f}: item_id is {t} but {files[ITEMS].name} has {item_kind} item ids; use one id type in both"
        )
    _require(f, s, "timestamp", pa.types.is_int64, "int64 unix seconds")
    has_weight = "weight" in s.names
    if has_weight:
        _require(f, s, "weight", _is_float, "float32")
    _check_no_nulls(f, metas[INTERACTIONS], INTERACTION_COLUMNS)

    counts = {
        "items": metas[ITEMS].num_rows,
        "users": metas[USERS].num_rows,
        "interactions": metas[INTERACTIONS].num_rows,
    }
    if manifest.get("counts") != counts:
        raise DataError(
            f"{directory / MANIFEST}: counts {manifest.get('counts')} do not match the Parquet files {counts}; "
            "the files were replaced after the manifest was written - regenerate the dataset"
        )
    if verify_checksums:
        for name, file in files.items():
            want = manifest.get("files", {}).get(name, {}).get("sha256")
            if want is not None and sha256_file(file) != want:
                raise DataError(f"{file}: checksum does not match {MANIFEST} (file corrupted or replaced)")
    return {
        "path": str(directory),
        "manifest": manifest,
        "counts": counts,
        "item_id_kind": item_kind,
        "user_id_kind": user_kind,
        "item_numeric": item_numeric,
        "item_categorical": item_categorical,
        "user_numeric": user_numeric,
        "user_categorical": user_categorical,
        "has_weight": has_weight,
    }


def _read(path: str | Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    file = _dataset_file(path, name)
    _check_columns(file, _parquet_file(file).schema_arrow, columns)
    try:
        return pq.read_table(file, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: cannot read ({e})") from e


def read_items(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The whole catalog as a DataFrame (use `iter_item_batches` for catalogs that do not fit)."""
    return _read(path, ITEMS, columns)


def read_users(path: str | Path) -> pd.DataFrame:
    return _read(path, USERS)


def read_interactions(path: str | Path) -> pd.DataFrame:
    return _read(path, INTERACTIONS)


def iter_item_batches(
    path_or_items_parquet: str | Path, batch_size: int = 65536, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the catalog in record batches; memory stays at about one row group.

    The file and columns are checked here, before the first batch is asked for.
    """
    p = Path(path_or_items_parquet)
    file = p if p.is_file() else _dataset_file(p, ITEMS)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    pf = _parquet_file(file)
    _check_columns(file, pf.schema_arrow, columns)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: cannot read ({e})") from e

    return batches()


def file_entry(file: Path) -> dict[str, Any]:
    """A manifest entry for one written Parquet file: columns, rows, size, checksum."""
    meta = pq.read_metadata(file)
    return {
        "columns": list(meta.schema.names),
        "rows": meta.num_rows,
        "bytes": file.stat().st_size,
        "sha256": sha256_file(file),
    }


def write_manifest(directory: Path, source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the three Parquet files already in `directory` and write its manifest."""
    files = {name: file_entry(directory / name) for name in (ITEMS, USERS, INTERACTIONS)}
    manifest: dict[str, Any] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "source": source,
        "counts": {
            "items": files[ITEMS]["rows"],
            "users": files[USERS]["rows"],
            "interactions": files[INTERACTIONS]["rows"],
        },
        "files": files,
        **(extra or {}),
    }
    artifacts.write_manifest(directory / MANIFEST, manifest)
    return manifest


def write_dataset(
    out: str | Path,
    items: pd.DataFrame,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    source: str,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write in-memory frames as a dataset directory, atomically, and validate it before it lands."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, frame in ((ITEMS, items), (USERS, users), (INTERACTIONS, interactions)):
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / name)
        write_manifest(tmp, source, extra)
        validate_dataset(tmp)
    log.info("wrote dataset %s (%d items, %d users, %d interactions)", out, len(items), len(users), len(interactions))
    return out

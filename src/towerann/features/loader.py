"""Bulk-load a dataset's user features into a FeatureStore.

Static features come from `users.parquet` (user_id + number/string columns); each user's offline
history (`recent_items`, newest first) from `interactions.parquet` (user_id, item_id, timestamp).
Users who appear only in the interactions are loaded too, with empty static features: their
history is what the user tower needs most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from towerann.errors import ConfigError, DataError
from towerann.features.store import RECENT_ITEMS, FeatureStore

log = logging.getLogger(__name__)

USERS_FILE = "users.parquet"
INTERACTIONS_FILE = "interactions.parquet"


def load_dataset_features(
    store: FeatureStore, dataset_dir: str | Path, recent_n: int = 50, batch_size: int = 5000
) -> int:
    """Put every user of the dataset into `store`; return how many users were written."""
    if isinstance(recent_n, bool) or not isinstance(recent_n, int) or recent_n < 0:
        raise ConfigError(f"recent_n must be an integer >= 0, got {recent_n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DataError(
            f"{d}: dataset directory not found; give the folder that holds {USERS_FILE} and {INTERACTIONS_FILE}"
        )
    users_path, inter_path = d / USERS_FILE, d / INTERACTIONS_FILE
    if not users_path.exists() and not inter_path.exists():
        raise DataError(f"{d}: neither {USERS_FILE} nor {INTERACTIONS_FILE} is there; is this a towerann dataset?")
    t0 = time.perf_counter()
    users = read_users(users_path) if users_path.exists() else pd.DataFrame({"user_id": pd.Series([], dtype=str)})
    if not users_path.exists():
        log.warning("%s: missing; loading history only (no static features)", users_path)
    history = read_history(inter_path, recent_n) if inter_path.exists() else {}
    if not inter_path.exists():
        log.warning("%s: missing; loading static features only (no recent_items)", inter_path)

    with_static = set(users["user_id"])
    total = len(users) + sum(1 for u in history if u not in with_static)
    written = 0
    with tqdm(total=total, unit="user", desc="features", disable=None) as bar:
        batch: list[dict[str, Any]] = []
        for row in _rows(users, history, with_static):
            batch.append(row)
            if len(batch) >= batch_size:
                written += store.put_users(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            written += store.put_users(batch)
            bar.update(len(batch))
    log.info(
        "loaded %d users (%d with static features, %d with history) in %.2fs",
        written,
        len(users),
        len(history),
        time.perf_counter() - t0,
    )
    return written


def _rows(users: pd.DataFrame, history: dict[str, list[str]], seen: set[str]) -> Iterator[dict[str, Any]]:
    columns = list(users.columns)
    for values in zip(*(users[c].tolist() for c in columns)):
        row = dict(zip(columns, values))
        row[RECENT_ITEMS] = history.get(row["user_id"], [])
        yield row
    for user_id, items in history.items():
        if user_id not in seen:
            yield {"user_id": user_id, RECENT_ITEMS: items}


def _read_table(path: Path, required: tuple[str, ...]) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {schema.names}")
    return pq.read_table(path)


def _check_no_nulls(path: Path, series: pd.Series, name: str) -> None:
    if series.isna().any():
        raise DataError(f"{path}: column {name!r} has {int(series.isna().sum())} empty values; every row needs one")


def _id_column(path: Path, series: pd.Series, name: str) -> pd.Series:
    _check_no_nulls(path, series, name)
    return series.astype(str)


def read_users(path: Path) -> pd.DataFrame:
    """users.parquet -> DataFrame with user_id as str and features as float or str columns."""
    df = _read_table(path, ("user_id",)).to_pandas()
    df["user_id"] = _id_column(path, df["user_id"], "user_id")
    if df["user_id"].duplicated().any():
        dup = df.loc[df["user_id"].duplicated(), "user_id"].iloc[0]
        raise DataError(f"{path}: user_id {dup!r} appears more than once; keep one row per user")
    for col in df.columns:
        if col == "user_id":
            continue
        if col == RECENT_ITEMS:
            raise DataError(
                f"{path}: column {RECENT_ITEMS!r} is reserved for the history built from {INTERACTIONS_FILE}; rename it"
            )
        s = df[col]
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            df[col] = s.astype("float64")
        elif isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(s):
            bad = s[s.notna()].map(lambda v: not isinstance(v, str))
            if bad.any():
                raise DataError(
                    f"{path}: column {col!r} mixes strings with other values "
                    f"(e.g. {s[s.notna()][bad].iloc[0]!r}); make it all strings or all numbers"
                )
            df[col] = s.astype(object).where(s.notna(), None)
        else:
            raise DataError(
                f"{path}: column {col!r} has type {s.dtype}; static features must be numbers "
                "or strings (convert it, or drop the column)"
            )
    return df


def read_history(path: Path, recent_n: int) -> dict[str, list[str]]:
    """Per user, the last `recent_n` item ids by timestamp, newest first.

    Equal timestamps: the later row in the file counts as newer (logs are appended in time order).
    """
    table = _read_table(path, ("user_id", "item_id", "timestamp"))
    df = table.select(["user_id", "item_id", "timestamp"]).to_pandas()
    if not pd.api.types.is_numeric_dtype(df["timestamp"]) or pd.api.types.is_bool_dtype(df["timestamp"]):
        raise DataError(f"{path}: column 'timestamp' has type {df['timestamp'].dtype}; expected int64 unix seconds")
    if df["timestamp"].isna().any():
        raise DataError(f"{path}: column 'timestamp' has empty values; every interaction needs a time")
    if recent_n == 0 or df.empty:
        return {}
    for name in ("user_id", "item_id"):
        _check_no_nulls(path, df[name], name)
    codes, uniques = pd.factorize(df["user_id"])
    user_ids = pd.Series(uniques).astype(str).tolist()  # same str() as users.parquet gets
    # numpy lexsort (last key is primary): by user, then newest timestamp, then latest row;
    # pandas groupby().agg(list) is several times slower on millions of rows.
    order = np.lexsort((-np.arange(len(df)), -df["timestamp"].to_numpy(), codes))
    codes = codes[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    rank = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    keep = rank < recent_n
    codes = codes[keep]
    items = pd.Series(df["item_id"].to_numpy()[order[keep]]).astype(str).tolist()  # only the kept ones
    bounds = np.r_[np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]), len(codes)].tolist()
    return {user_ids[codes[a]]: items[a:b] for a, b in zip(bounds[:-1], bounds[1:])}

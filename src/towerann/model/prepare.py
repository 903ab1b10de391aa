"""Turn a dataset into tower inputs: a time-ordered split and per-interaction histories.

The split is per user and ordered by time: each user's oldest interactions train, the next ones
validate (early stopping), the newest ones test (`towerann eval`). Each interaction carries the
user's previous N items as its history, the same input the user tower sees at serving time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from towerann.data.dataset import read_interactions, read_items, read_users, validate_dataset
from towerann.errors import DataError
from towerann.model.schema import FeatureSchema

log = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2


@dataclass
class Prepared:
    items: pd.DataFrame  # the catalog, row r = catalog row r
    users: pd.DataFrame
    # one row per interaction, sorted by (user, timestamp)
    user_row: np.ndarray  # i64: row in `users` (-1 if the user has no row there)
    item_row: np.ndarray  # i64: catalog row
    user_key: np.ndarray  # external user id
    split: np.ndarray  # i8: TRAIN / VALID / TEST
    hist_rows: np.ndarray  # i64 [n, N]: catalog rows of the previous N items, newest first, -1 pad


def load_dataset(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    validate_dataset(path)
    return read_items(path), read_users(path), read_interactions(path)


def time_split(user_codes: np.ndarray, valid_frac: float, test_frac: float) -> np.ndarray:
    """Per-user position split of interactions already sorted by (user, time)."""
    n = len(user_codes)
    starts = np.r_[0, np.flatnonzero(np.diff(user_codes)) + 1]
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)
    count = np.repeat(counts, counts)
    n_test = np.floor(count * test_frac).astype(np.int64)
    n_valid = np.floor(count * valid_frac).astype(np.int64)
    split = np.full(n, TRAIN, np.int8)
    split[pos >= count - n_test - n_valid] = VALID
    split[pos >= count - n_test] = TEST
    return split


def history_matrix(user_codes: np.ndarray, item_rows: np.ndarray, n: int) -> np.ndarray:
    """For interactions sorted by (user, time): the previous n item rows of the same user, newest first."""
    hist = np.full((len(item_rows), n), -1, np.int64)
    for j in range(1, n + 1):
        same = np.zeros(len(item_rows), bool)
        same[j:] = user_codes[j:] == user_codes[:-j]
        hist[j:, j - 1] = np.where(same[j:], item_rows[:-j], -1)
    return hist


def prepare(path: str | Path, history_len: int, valid_frac: float = 0.1, test_frac: float = 0.2) -> Prepared:
    items, users, inter = load_dataset(path)
    catalog = pd.Index(items["item_id"])
    if not catalog.is_unique:
        raise DataError(f"{Path(path) / 'items.parquet'}: item_id values are not unique")
    item_row = catalog.get_indexer(inter["item_id"])
    unknown = item_row < 0
    if unknown.any():
        log.warning("%d interactions name items missing from items.parquet; they are ignored", int(unknown.sum()))
        inter = inter.loc[~unknown]
        item_row = item_row[~unknown]
    inter = inter.assign(_row=item_row).sort_values(["user_id", "timestamp"], kind="stable")
    user_codes = pd.factorize(inter["user_id"])[0]
    item_row = inter["_row"].to_numpy(np.int64)
    return Prepared(
        items=items,
        users=users,
        user_row=pd.Index(users["user_id"]).get_indexer(inter["user_id"]).astype(np.int64),
        item_row=item_row,
        user_key=inter["user_id"].to_numpy(),
        split=time_split(user_codes, valid_frac, test_frac),
        hist_rows=history_matrix(user_codes, item_row, history_len),
    )


def build_schema(p: Prepared, history_len: int) -> FeatureSchema:
    return FeatureSchema.from_frames(p.items, p.users, history_len)

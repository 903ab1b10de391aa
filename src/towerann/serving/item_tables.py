"""A bundle's per-item tables: external id per internal id, the model's category per internal id, and
the external id -> internal id lookup.

Read into memory they cost up to 32 bytes an item (int64 ids, the model's int64 categories, the
lookup's int64 sorted copy of the ids and its argsort): a 100M-item server held ~20 B/item more than
its index's own 18.6. Here the published part of each table is memory-mapped from the bundle's files
(the page cache's, read only for the ids a request touches), and what live writes add lives in a
small in-memory tail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import load_npy, save_npy
from towerann.errors import ArtifactError
from towerann.index.base import advise_random

# The id lookup as published beside external_ids.npy: the ids sorted, and each one's internal id.
LOOKUP_KEYS_FILE = "item_lookup_keys.npy"
LOOKUP_ORDER_FILE = "item_lookup_order.npy"


def lookup_keys(external_ids: np.ndarray) -> np.ndarray:
    """What the lookup searches: integer ids as they are, any other id as its string."""
    return np.asarray(external_ids if external_ids.dtype.kind in "iu" else external_ids.astype(str))


def save_id_lookup(directory: Path, external_ids: np.ndarray) -> None:
    """Write the sorted ids and their internal ids, so that a load maps them instead of sorting."""
    keys = lookup_keys(external_ids)
    order = np.argsort(keys, kind="stable")
    save_npy(directory / LOOKUP_KEYS_FILE, keys[order])
    save_npy(directory / LOOKUP_ORDER_FILE, order.astype(np.int32 if len(order) < 2**31 else np.int64))


class IdLookup:
    """External item id (as a string) -> internal id, for millions of ids without a Python dict.

    The catalog's ids sorted (memory-mapped when the bundle published them, else sorted here once,
    16 bytes an id) and found by binary search; items added live go to a small dict. A million-entry
    dict cost ~100 MB, ~1 s to build and a 100 ms GIL-holding rehash, which a server loading a new
    bundle in the background added to its requests' latency."""

    def __init__(self, external_ids: np.ndarray, published: tuple[np.ndarray, np.ndarray] | None = None):
        self._ints = external_ids.dtype.kind in "iu"
        if published is None:
            keys = lookup_keys(external_ids)
            self._order = np.argsort(keys, kind="stable")
            self._sorted = keys[self._order]
        else:
            self._sorted, self._order = published
        self._added: dict[str, int] = {}

    @classmethod
    def from_directory(cls, directory: Path, external_ids: np.ndarray) -> IdLookup:
        """The lookup a bundle directory publishes (mapped), or one sorted here for an older bundle."""
        keys_file, order_file = directory / LOOKUP_KEYS_FILE, directory / LOOKUP_ORDER_FILE
        if not (keys_file.is_file() and order_file.is_file()):
            return cls(external_ids)
        keys, order = load_npy(keys_file, mmap=True), load_npy(order_file, mmap=True)
        if (
            keys.shape != external_ids.shape
            or order.shape != external_ids.shape
            or order.dtype.kind not in "iu"
            or (keys.dtype.kind in "iu") != (external_ids.dtype.kind in "iu")
        ):
            raise ArtifactError(
                f"{directory}: the id lookup holds {keys.dtype}{list(keys.shape)} / {order.dtype}"
                f"{list(order.shape)} for {len(external_ids)} ids; republish the bundle"
            )
        for table in (keys, order):
            advise_random(table)  # a binary search reads a page per step: no read-ahead around it
        return cls(external_ids, (keys, order))

    def get(self, item_id: str, default: int | None = None) -> int | None:
        found = self._added.get(item_id)
        if found is not None:
            return found
        key: Any = item_id
        if self._ints:
            try:
                key = int(item_id)
            except ValueError:
                return default
            if str(key) != item_id:  # one spelling per id, as the catalog prints it ("7", not "007")
                return default
        i = int(np.searchsorted(self._sorted, key))
        if i < len(self._sorted) and self._sorted[i] == key:
            return int(self._order[i])
        return default

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.get(item_id) is not None

    def __setitem__(self, item_id: str, internal: int) -> None:
        self._added[item_id] = internal

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)


def appended(view: np.ndarray, extra: np.ndarray, buffer: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """`view` with `extra` after it, as the front of `buffer`, and the buffer: in place when `view` is
    `buffer`'s front and `buffer` has room (and its dtype holds `extra`), else in a new buffer half as
    large again (the caller keeps it as its `buffer`: only its owner may write past the front). A live
    write copying every id (two arrays of 1M) held the event loop ~3 ms, once per slice of the write
    (freshness.live)."""
    n, m = len(view), len(extra)
    dtype = np.result_type(view.dtype, extra.dtype)
    in_place = (
        buffer is not None
        and view.base is buffer
        and view.ctypes.data == buffer.ctypes.data
        and buffer.dtype == dtype
        and len(buffer) >= n + m
    )
    if not in_place:
        buffer = np.empty(n + m + max(n // 2, 64), dtype)
        buffer[:n] = view
    assert buffer is not None
    buffer[n : n + m] = extra
    return buffer[: n + m], buffer


class ItemColumn:
    """One value per internal id: the published rows (`base`, a memory-mapped file or any array,
    never written), then the rows live writes added, in memory (`appended`'s room).

    `translate`: the values are `translate[base[i]]` (a small table: the model's category code for
    each bundle category code, -1 reading its last entry); a live change to a published row is kept
    in a dict beside it. Readers take the tail once, so a write between two reads never mixes."""

    def __init__(self, base: np.ndarray, translate: np.ndarray | None = None):
        self._base = base
        self._translate = translate
        dtype = base.dtype if translate is None else translate.dtype
        self._tail = np.empty(0, dtype)
        self._room: np.ndarray | None = None
        self._changed: dict[int, Any] = {}

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(self._tail.dtype, self._base.dtype if self._translate is None else self._translate.dtype)

    def __len__(self) -> int:
        return len(self._base) + len(self._tail)

    def __getitem__(self, rows: Any) -> Any:
        """One row (an int: its value) or many (an int array: an array)."""
        tail, n, translate = self._tail, len(self._base), self._translate
        if np.ndim(rows) == 0:
            i = int(rows)
            if i < 0:
                raise IndexError(f"row {i} of an item table")
            if i >= n:
                return tail[i - n]
            changed = self._changed.get(i)
            if changed is not None:
                return changed
            return self._base[i] if translate is None else translate[self._base[i]]
        rows = np.asarray(rows, np.int64)
        changed = self._changed.copy()  # one atomic copy: a write meanwhile adds to the dict
        if not len(tail) and not changed:  # the common case: published rows only
            values = np.asarray(self._base[rows])
            return values if translate is None else translate[values]
        out = np.empty(len(rows), self.dtype)
        old = rows < n
        values = np.asarray(self._base[rows[old]])
        out[old] = values if translate is None else translate[values]
        out[~old] = tail[rows[~old] - n]
        if changed:
            hit = np.flatnonzero(old & np.isin(rows, np.fromiter(changed, np.int64, len(changed))))
            out[hit] = [changed[int(r)] for r in rows[hit]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row, as one in-memory array (a test's or a tool's view; requests read rows)."""
        out: np.ndarray = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def __setitem__(self, row: int, value: Any) -> None:
        n = len(self._base)
        if row >= n:
            self._tail[row - n] = value  # the tail is this column's own buffer
        else:
            self._changed[row] = value

    def append(self, extra: np.ndarray) -> None:
        self._tail, self._room = appended(self._tail, extra, self._room)

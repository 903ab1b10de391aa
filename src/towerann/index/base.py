"""`SlotIndex`: the bookkeeping every backend shares, under the `Index` contract (index.protocol).

A backend stores vectors under *slots* (0, 1, 2, ... in insertion order); this base class maps
slots to item ids and keeps per-slot attributes (category, removed, available, and any declared
filter attributes as int32 codes: `attributes`). An upsert or a
removal only marks the old slot dead, so no library ever has to delete in place; the mask of
live-and-available slots is handed to the library (as a bitmap selector where it can take one).

Which path a masked search takes (brute force over the qualifying items, the library's filtered
search, or over-fetch + post-filter) is decided per query by `towerann.index.path_choice` from the
mask's exact count and the index's measured thresholds (search param `filter_plan`, measured by
`towerann.index.filter_plan`).

Contract of `search`: exactly k results whenever at least k items qualify; when the library
returns fewer (selective filter, many dead slots) the short rows fall back to exact search over
the qualifying slots. Mutations must not run concurrently with searches (the serving layer
serialises them); searches may run in parallel with each other.

What a backend implements: `_add_vectors`, `_search`, `_vectors`, `_save_backend`, `_load_backend`
(and may replace `_exact`, the brute force). What other modules of this package read (the filter
planner, partitions, a backend's memory accounting) goes through the public slot hooks below:
`slot_ids`, `slot_categories`, `slot_alive`, `slot_returnable`, `slot_attributes`, `slots_of`,
`aligned_slots`, `vectors_of_slots`, `mask_for`, `run_path`, `exact_search_slots`,
`library_search_slots`, `partition_info`, `slot_table_bytes`, `load_saved_vectors`.
`exact_search_slots` and `library_search_slots` call `_exact` and `_search`, so every search, from
here or from another module, goes through the one method a backend overrides.
"""

from __future__ import annotations

import functools
import logging
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from towerann.artifacts import load_npy, save_npy
from towerann.config import ATTRIBUTE_NAME  # a name becomes a file name here: slot_attr_<name>.npy
from towerann.errors import ArtifactError, BadRequest, ConfigError, DataError
from towerann.index import path_choice
from towerann.index.merge import padded, topk_blocked, topk_rows
from towerann.index.protocol import COMMON_SEARCH, Filter, Index, SearchResult, as_vectors

log = logging.getLogger(__name__)

BY_INDEX_ROWS = 4  # masked brute force for at most this many queries reads the qualifying rows in place


class Growable:
    """A 1-d or 2-d numpy buffer that grows by doubling, so incremental adds stay amortised O(1)."""

    def __init__(self, data: np.ndarray):
        self._buf = data
        self.n = len(data)

    @property
    def data(self) -> np.ndarray:
        return self._buf[: self.n]

    def extend(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._buf) or not self._buf.flags.writeable:
            cap = max(need, 2 * len(self._buf), 16)
            buf = np.empty((cap,) + self._buf.shape[1:], self._buf.dtype)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self._buf[self.n : need] = rows
        self.n = need

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the buffer, spare capacity included."""
        return int(self._buf.nbytes)


@dataclass
class Mask:
    """Slots that may be returned for one (filter, index state); conversions are computed once."""

    bits: np.ndarray  # bool [n_slots]
    count: int
    _packed: np.ndarray | None = field(default=None, repr=False)
    _idx: np.ndarray | None = field(default=None, repr=False)

    @property
    def packed(self) -> np.ndarray:
        """Little-endian bit-packed form, as faiss.IDSelectorBitmap reads it."""
        if self._packed is None:
            self._packed = np.packbits(self.bits, bitorder="little")
        return self._packed

    @property
    def idx(self) -> np.ndarray:
        if self._idx is None:
            self._idx = np.flatnonzero(self.bits)
        return self._idx

    @classmethod
    def from_slots(cls, slots: np.ndarray, n_slots: int) -> Mask:
        """A mask keeping `slots` (sorted, unique) of `n_slots`; its slot list is `slots` itself."""
        bits = np.zeros(n_slots, bool)
        bits[slots] = True
        return cls(bits=bits, count=len(slots), _idx=slots)


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def madvise_pages(buf: np.ndarray, page: int, advices: tuple[int, ...]) -> int:
    """madvise(advice) for each advice, in order, over the whole `page`-sized pages inside `buf` (never
    its allocator's headers); return the bytes covered, or 0 (not Linux, nothing whole, a call failed).
    ctypes releases the GIL for the calls, so the kernel's work does not stall requests."""
    import ctypes
    import sys

    if sys.platform != "linux":
        return 0
    start = -(-buf.ctypes.data // page) * page
    end = (buf.ctypes.data + buf.nbytes) // page * page
    if end <= start:
        return 0
    for advice in advices:
        if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) != 0:
            log.debug("madvise(%d) failed (errno %d); the pages stay as they are", advice, ctypes.get_errno())
            return 0
    return end - start


def release_pages(buf: np.ndarray) -> int:
    """Hand the whole pages inside `buf` back to the kernel (madvise DONTNEED); return the bytes.

    The buffer must never be read again (its pages read as zeros): call this only on memory about
    to be freed."""
    import mmap

    return madvise_pages(buf, mmap.PAGESIZE, (4,))  # 4 = MADV_DONTNEED (Linux)


def inner_products(q: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Scores [m, n] = q @ vecs.T, laid out for BLAS: one query is a gemv, which OpenBLAS runs
    ~20x faster than the equivalent 1-row gemm that `q @ vecs.T` becomes."""
    scores: np.ndarray = (vecs @ q[0])[None, :] if len(q) == 1 else (vecs @ q.T).T
    return scores


def inner_products_at(q: np.ndarray, vecs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Scores [m, len(idx)] = q @ vecs[idx].T without the gather: faiss reads just the qualifying rows.
    For a query or two (the serving path) this beat the gather + gemv 2-4x, and a full scan with
    the rest set to -inf up to 60% kept (200k x 128-d), as it reads each qualifying row once."""
    import faiss

    idx = np.ascontiguousarray(idx, dtype=np.int64)
    out = np.empty((len(q), len(idx)), np.float32)
    for i in range(len(q)):
        faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]
            faiss.swig_ptr(out[i]),
            faiss.swig_ptr(q[i]),
            faiss.swig_ptr(vecs),
            faiss.swig_ptr(idx),
            vecs.shape[1],
            1,
            len(idx),
        )
    return out


class SlotIndex(Index):
    """An `Index` whose backend stores vectors under slots; this class keeps the slot tables, the
    masks, the exact fallback and the filter planner's hooks."""

    def __init__(self, dim: int, metric: str = "ip", **build_params: Any):
        super().__init__(dim, metric, **build_params)
        self._ids = Growable(np.empty(0, np.int64))  # id per slot
        self._cats = Growable(np.empty(0, np.int32))  # category per slot (-1: none)
        self._attrs: dict[str, Growable] = {}  # filter attribute -> int32 code per slot (-1: none)
        self._alive = Growable(np.empty(0, bool))  # False once removed or replaced
        self._avail = Growable(np.empty(0, bool))  # availability flag (reversible)
        self._ok = Growable(np.empty(0, bool))  # alive & available: may be returned
        self._n_ok = 0
        self._n_alive = 0
        self._sorted_ids = np.empty(0, np.int64)  # ids of live slots, sorted, for id -> slot lookups
        self._sorted_slots = np.empty(0, np.int64)
        self._gen = 0  # bumped on every mutation; invalidates cached masks
        self._masks: dict[Any, Mask] = {}

    # ---- backend hooks ------------------------------------------------------------------------
    @abstractmethod
    def _add_vectors(self, vectors: np.ndarray, first_slot: int, build: bool) -> None:
        """Store vectors under slots first_slot, first_slot+1, ... (build=True: first batch, may train)."""

    @abstractmethod
    def _search(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Library search: (slots int64 [m, k], scores f32 [m, k]), -1 where it found fewer; never a masked-out slot."""

    @abstractmethod
    def _vectors(self) -> np.ndarray:
        """All stored vectors, [n_slots, dim] (a view where the library allows), for exact fallback."""

    @abstractmethod
    def _save_backend(self, directory: Path) -> dict[str, Any]:
        """Write the backend's files; return extra manifest fields."""

    @abstractmethod
    def _load_backend(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Restore the backend's state from `_save_backend`'s files (slot tables are already loaded)."""

    # ---- public API -----------------------------------------------------------------------------
    def build(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Index a whole catalog (the index must be empty). `attributes`: {name: int codes, one per
        vector row (-1: no value)}, the filter attributes besides category."""
        if self._ids.n:
            raise ConfigError(
                f"{self.kind} index already holds {self._ids.n} slots; build() needs a fresh index "
                "(use add() for more items)"
            )
        self._insert(vectors, ids, categories, available, build=True, attributes=attributes)

    def add(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Add items; an id already present is replaced (its old vector is never returned again).
        An attribute the batch does not give is -1 (no value) for its items."""
        self._insert(vectors, ids, categories, available, build=self._ids.n == 0, attributes=attributes)

    @property
    def attribute_names(self) -> list[str]:
        return sorted(self._attrs)

    def attribute_codes(self, ids: Any) -> dict[str, np.ndarray]:
        """{attribute: int32 code per id} of live items (-1 for unknown ids or no value)."""
        hit, slots = self.aligned_slots(ids)
        out = {name: np.full(len(hit), -1, np.int32) for name in self._attrs}
        for name, codes in self._attrs.items():
            out[name][hit] = codes.data[slots]
        return out

    def set_attributes(self, ids: Any, attributes: Mapping[str, Any]) -> None:
        """Change filter attributes of live items in place ({name: one code per id}; a new name is
        -1 for every other item). Unknown ids are ignored; the next search sees the change."""
        hit, slots = self.aligned_slots(ids)
        attrs = self._check_attributes(attributes, len(hit))
        for name, codes in attrs.items():
            if name not in self._attrs:
                self._attrs[name] = Growable(np.full(self._ids.n, -1, np.int32))
            self._attrs[name].data[slots] = codes[hit]
        self._gen += 1

    def remove(self, ids: Any) -> None:
        """Delete items for good. Unknown ids are ignored (removal is idempotent)."""
        slots = self.slots_of(ids)
        if not len(slots):
            return
        self._alive.data[slots] = False
        self._drop_keys(slots)
        self._refresh_ok(slots)

    def set_available(self, ids: Any, available: bool) -> None:
        """Hide (False) or show again (True) items without removing them. Unknown ids are ignored."""
        slots = self.slots_of(ids)
        if len(slots):
            self._avail.data[slots] = bool(available)
            self._refresh_ok(slots)

    def __len__(self) -> int:
        return self._n_alive

    def __contains__(self, item_id: int) -> bool:
        return len(self.slots_of([item_id])) > 0

    @property
    def n_slots(self) -> int:
        """Slots stored, dead ones included (what a rebuild would reclaim)."""
        return self._ids.n

    def search(
        self, queries: Any, k: int, filter: Filter | None = None, params: dict[str, Any] | None = None
    ) -> SearchResult:
        q = as_vectors(queries, self.dim, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadRequest(f"k must be a positive integer, got {k!r}")
        k = int(k)
        p = self.search_defaults if not params else self._merge_params(params)
        mask = self.mask_for(filter)
        n_qual = self._ids.n if mask is None else mask.count
        if n_qual == 0:
            ids, scores = padded(len(q), k)
            return SearchResult(ids=ids, scores=scores)
        path = None if mask is None else path_choice.choose(n_qual, len(mask.bits), k, p)
        slots, scores, exact_rows, short_rows = self.run_path(q, k, p, mask, path)
        ids = self._ids.data[slots]
        ids[slots < 0] = -1
        return SearchResult(ids=ids, scores=scores, exact_rows=exact_rows, short_rows=short_rows)

    def exact_search(self, queries: Any, k: int, filter: Filter | None = None) -> SearchResult:
        """Brute force over the same qualifying items: the ground truth for recall, on any backend."""
        q = as_vectors(queries, self.dim, "queries")
        mask = self.mask_for(filter)
        if (self._ids.n if mask is None else mask.count) == 0:
            ids, scores = padded(len(q), int(k))
            return SearchResult(ids=ids, scores=scores)
        slots, scores = self._exact(q, int(k), mask)
        ids = self._ids.data[slots]
        ids[slots < 0] = -1
        return SearchResult(ids=ids, scores=scores)

    # ---- slot hooks: what the filter planner, partitions and backends read ---------------------------
    @property
    def slot_ids(self) -> np.ndarray:
        """The item id of each slot, dead slots included (a view: do not write)."""
        return self._ids.data

    @property
    def slot_categories(self) -> np.ndarray:
        """The category code of each slot (-1: none; a view: do not write)."""
        return self._cats.data

    @property
    def slot_alive(self) -> np.ndarray:
        """Per slot: not removed or replaced (a view: do not write)."""
        return self._alive.data

    @property
    def slot_returnable(self) -> np.ndarray:
        """Per slot: alive and available, so a search may return it (a view: do not write)."""
        return self._ok.data

    @property
    def slot_attributes(self) -> dict[str, np.ndarray]:
        """{filter attribute: int32 code per slot (-1: no value)} (views: do not write)."""
        return {name: table.data for name, table in self._attrs.items()}

    def slots_of(self, ids: Any) -> np.ndarray:
        """Live slots of the given ids, sorted and unique (unknown ids skipped)."""
        ids = np.atleast_1d(np.asarray(ids))
        if not np.issubdtype(ids.dtype, np.integer) and len(ids):
            raise BadRequest(f"ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, max(len(self._sorted_ids) - 1, 0))
        if not len(self._sorted_ids):
            return np.empty(0, np.int64)
        hit = self._sorted_ids[pos] == ids
        return np.unique(self._sorted_slots[pos[hit]])

    def aligned_slots(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(found: bool per id, the live slot of each found id, in the ids' order)."""
        ids = np.atleast_1d(np.asarray(ids, np.int64))
        if not len(self._sorted_ids) or not len(ids):
            return np.zeros(len(ids), bool), np.empty(0, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        hit = self._sorted_ids[pos] == ids
        return hit, self._sorted_slots[pos[hit]]

    def vectors_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """The stored vectors of `slots`, [len(slots), dim] (a copy)."""
        vectors: np.ndarray = self._vectors()[slots]
        return vectors

    def slot_table_bytes(self, allocated: bool = False) -> int:
        """Bytes of the slot tables (ids, categories, flags, attributes) and the id -> slot lookup: in use,
        or `allocated` (the growable tables keep spare capacity)."""
        tables = (self._ids, self._cats, self._alive, self._avail, self._ok, *self._attrs.values())
        used = sum(t.allocated_bytes if allocated else t.data.nbytes for t in tables)
        return int(used + self._sorted_ids.nbytes + self._sorted_slots.nbytes)

    def mask_for(self, filter: Filter | None) -> Mask | None:
        """The slots a search may return, or None when every slot may be (the lean hot path)."""
        if filter is not None and filter.empty:
            filter = None
        if filter is None and self._n_ok == self._ids.n:
            return None
        key = (self._gen, filter)
        mask = self._masks.get(key)
        if mask is None:
            # The cache is read from more than one thread (requests, the recall monitor): a copy of its
            # keys, not an iterator over the live dict, which another thread's insert would break.
            keys = list(self._masks)
            if len(keys) > 64 or (keys and keys[0][0] != self._gen):
                self._masks = {}
            bits = self._ok.data
            if filter is not None:
                conditions = [] if filter.categories is None else [(self._cats, filter.categories)]
                for name, codes in filter.attributes:
                    if name not in self._attrs:
                        raise BadRequest(
                            f"filter: the {self.kind} index has no attribute {name!r}; it has "
                            f"{self.attribute_names or 'none'} (declare it in [filters] attributes)"
                        )
                    conditions.append((self._attrs[name], codes))
                for table, codes in conditions:  # AND across conditions, OR within each value set
                    bits = bits & np.isin(table.data, np.fromiter(codes, np.int64, len(codes)))
            mask = self._masks[key] = Mask(bits=bits, count=int(bits.sum()))
        return mask

    def run_path(
        self, q: np.ndarray, k: int, p: dict[str, Any], mask: Mask | None, path: str | None
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """One search along a planned path (None: unmasked, or the backend's own choice); returns
        (slots, scores, exact_rows, short_rows). Rows the library leaves short go exact."""
        n_qual = self._ids.n if mask is None else mask.count
        if n_qual <= k or path == "exact":
            slots, scores = self._exact(q, k, mask)
            return slots, scores, len(q), 0
        if mask is not None:
            p = {**p, "filter_path": path or "auto"}
        slots, scores = self._search(q, k, p, mask)
        short = slots[:, k - 1] < 0  # at least k qualify, so a short row is the library's shortfall
        n_short = int(short.sum())
        if n_short:
            log.debug(
                "%s: %d of %d rows short of k=%d; exact fallback over %d items", self.kind, n_short, len(q), k, n_qual
            )
            slots[short], scores[short] = self._exact(q[short], k, mask)
        return slots, scores, n_short, n_short

    def exact_search_slots(self, q: np.ndarray, k: int, mask: Mask | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the qualifying slots (all slots when mask is None): (slots, scores), -1 padded.
        `_exact` is the backend's hook; this is how other modules call it."""
        return self._exact(q, k, mask)

    def library_search_slots(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The library's own search (no planning, no exact fallback): (slots, scores), -1 where it found
        fewer. `_search` is the backend's hook; this is how other modules call it."""
        return self._search(q, k, params, mask)

    def partition_info(self) -> dict[str, Any] | None:
        """A backend with per-value partitions (the planner's "partition" path) describes them; None: none."""
        return None

    # ---- shared machinery ----------------------------------------------------------------------
    def _merge_params(self, params: dict[str, Any]) -> dict[str, Any]:
        known = {*COMMON_SEARCH, *self.default_search}
        unknown = set(params) - known
        if unknown:
            raise BadRequest(
                f"search params {sorted(unknown)} are not understood by the {self.kind} index; it takes {sorted(known)}"
            )
        if "filter_path" in params:
            path_choice.check_path(params["filter_path"])
            if params["filter_path"] == "partition" and "partition" not in self.filter_paths:
                raise BadRequest(
                    f"filter_path 'partition': this {self.kind} index has no partitions (build it "
                    "with partition_by=ATTRIBUTE)"
                )
        if "filter_plan" in params:
            path_choice.check_table(params["filter_plan"])
        return {**self.search_defaults, **params}

    def _exact(self, q: np.ndarray, k: int, mask: Mask | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the qualifying slots (all slots when mask is None)."""
        vecs = self._vectors()
        if mask is None:
            return topk_blocked(q, k, lambda b: inner_products(b, vecs), len(vecs))
        if len(q) <= BY_INDEX_ROWS and vecs.dtype == np.float32 and vecs.flags.c_contiguous:
            return topk_rows(inner_products_at(q, vecs, mask.idx), k, labels=mask.idx)
        if mask.count * 4 > len(mask.bits):
            # Most slots qualify: score them all and exclude the rest, rather than gather the
            # qualifying vectors (at 1M items a 0.5 GB copy per call, e.g. in a bundle's validation).
            def masked(b: np.ndarray) -> np.ndarray:
                scores = inner_products(b, vecs)
                scores[:, ~mask.bits] = -np.inf
                return scores

            return topk_blocked(q, k, masked, len(vecs))
        idx = mask.idx
        qualifying = vecs[idx]
        return topk_blocked(q, k, lambda b: inner_products(b, qualifying), len(idx), labels=idx)

    def _insert(
        self,
        vectors: Any,
        ids: Any,
        categories: Any,
        available: Any,
        build: bool,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        v = as_vectors(vectors, self.dim, "vectors")
        n = len(v)
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(
                f"ids: expected {n} integer ids (one per vector row), got shape {ids.shape} dtype {ids.dtype}"
            )
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != n:
            raise DataError("ids: duplicate ids in one batch; each item must appear once")
        cats = np.full(n, -1, np.int32) if categories is None else np.asarray(categories)
        if cats.shape != (n,):
            raise DataError(f"categories: expected {n} values (one per vector row), got shape {cats.shape}")
        avail = np.ones(n, bool) if available is None else np.asarray(available, bool)
        if avail.shape != (n,):
            raise DataError(f"available: expected {n} flags (one per vector row), got shape {avail.shape}")
        attrs = self._check_attributes(attributes, n)
        if n == 0:
            return
        old = self.slots_of(ids)
        first = self._ids.n
        self._add_vectors(v, first, build)  # the library first: if it fails, the tables stay consistent
        if len(old):  # upsert: the old slots die
            self._alive.data[old] = False
            self._drop_keys(old)
            self._refresh_ok(old)
        self._ids.extend(ids)
        self._cats.extend(cats.astype(np.int32))
        for name in attrs.keys() - self._attrs.keys():  # a new attribute: no value for the slots before
            self._attrs[name] = Growable(np.full(first, -1, np.int32))
        for name, table in self._attrs.items():
            table.extend(attrs[name] if name in attrs else np.full(n, -1, np.int32))
        self._alive.extend(np.ones(n, bool))
        self._avail.extend(avail)
        self._ok.extend(avail)
        self._n_ok += int(avail.sum())
        self._n_alive += n
        new_slots = np.arange(first, first + n, dtype=np.int64)
        keys = np.concatenate([self._sorted_ids, ids])
        order = np.argsort(keys, kind="stable")
        self._sorted_ids = keys[order]
        self._sorted_slots = np.concatenate([self._sorted_slots, new_slots])[order]
        self._gen += 1

    @staticmethod
    def _check_attributes(attributes: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, codes in (attributes or {}).items():
            if not isinstance(name, str) or not ATTRIBUTE_NAME.match(name) or name == "categories":
                raise DataError(
                    f"attribute name {name!r}: use 1-32 characters a-z, 0-9, _ starting with a letter "
                    "(not 'categories')"
                )
            a = np.asarray(codes)
            if a.shape != (n,) or not (np.issubdtype(a.dtype, np.integer) or n == 0):
                raise DataError(
                    f"attributes[{name!r}]: expected {n} integer codes (one per vector row), got "
                    f"shape {a.shape} dtype {a.dtype}"
                )
            out[name] = a.astype(np.int32)
        return out

    def _drop_keys(self, slots: np.ndarray) -> None:
        keep = ~np.isin(self._sorted_slots, slots)
        self._sorted_ids = self._sorted_ids[keep]
        self._sorted_slots = self._sorted_slots[keep]
        self._n_alive = len(self._sorted_ids)

    def _refresh_ok(self, slots: np.ndarray) -> None:
        ok = self._ok.data
        before = int(ok[slots].sum())
        ok[slots] = self._alive.data[slots] & self._avail.data[slots]
        self._n_ok += int(ok[slots].sum()) - before
        self._gen += 1

    # ---- persistence ---------------------------------------------------------------------------
    def load_saved_vectors(self, directory: Path, name: str) -> Growable:
        """A backend's saved full vectors (for its `_load_backend`), memory-mapped (copied into memory
        only if items are added), checked against the slot count and dim of the manifest."""
        vecs = load_npy(directory / name, mmap=True)
        if vecs.shape != (self.n_slots, self.dim) or vecs.dtype != np.float32:
            raise ArtifactError(
                f"{directory / name}: {vecs.dtype}{list(vecs.shape)} does not match "
                f"float32[{self.n_slots}, {self.dim}] in the manifest"
            )
        return Growable(vecs)

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the index files into `directory` (which must exist); return the manifest fields."""
        directory = Path(directory)
        for name, arr in (
            ("ids", self._ids.data),
            ("categories", self._cats.data),
            ("alive", self._alive.data),
            ("available", self._avail.data),
        ):
            save_npy(directory / f"slot_{name}.npy", arr)
        for name, table in self._attrs.items():
            save_npy(directory / f"slot_attr_{name}.npy", table.data)
        backend = self._save_backend(directory)
        return {
            "backend": self.kind,
            "build_params": self.build_params,
            "description": self.describe(),
            "dim": self.dim,
            "metric": self.metric,
            "count": len(self),
            "slots": self._ids.n,
            "search_defaults": self.search_defaults,
            "tuning": self.tuning,
            "filter_calibration": self.filter_calibration,
            "attributes": self.attribute_names,
            "backend_state": backend,
        }

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> Self:
        """Rebuild an index from `save`'s files; checksums are checked by the snapshot layer."""
        directory = Path(directory)
        try:
            index = cls(int(manifest["dim"]), manifest["metric"], **manifest["build_params"])
            index.search_defaults = {**COMMON_SEARCH, **manifest["search_defaults"]}
            index.tuning = manifest.get("tuning")
            index.filter_calibration = manifest.get("filter_calibration")
            n = int(manifest["slots"])
            state = manifest["backend_state"]
            attr_names = [str(a) for a in manifest.get("attributes") or []]
            path_choice.check_table(index.search_defaults["filter_plan"])
        except (KeyError, TypeError, ValueError, BadRequest) as e:
            raise ArtifactError(f"{directory}: index manifest is missing or has a bad field ({e})") from e
        bad = [a for a in attr_names if not ATTRIBUTE_NAME.match(a)]
        if bad:
            raise ArtifactError(f"{directory}: manifest lists attributes {bad}, which are not attribute names")
        names = ("ids", "categories", "alive", "available", *(f"attr_{a}" for a in attr_names))
        tables = {name: load_npy(directory / f"slot_{name}.npy") for name in names}
        for name, arr in tables.items():
            if arr.shape != (n,):
                raise ArtifactError(
                    f"{directory / f'slot_{name}.npy'}: {arr.shape} does not match {n} slots in the manifest"
                )
        index._ids = Growable(tables["ids"].astype(np.int64))
        index._cats = Growable(tables["categories"].astype(np.int32))
        index._alive = Growable(tables["alive"].astype(bool))
        index._avail = Growable(tables["available"].astype(bool))
        index._attrs = {a: Growable(tables[f"attr_{a}"].astype(np.int32)) for a in attr_names}
        ok = index._alive.data & index._avail.data
        index._ok = Growable(ok.copy())
        index._n_ok = int(ok.sum())
        live = np.flatnonzero(index._alive.data)
        order = np.argsort(index._ids.data[live], kind="stable")
        index._sorted_slots = live[order].astype(np.int64)
        index._sorted_ids = index._ids.data[index._sorted_slots]
        index._n_alive = len(live)
        index._load_backend(directory, state)
        return index

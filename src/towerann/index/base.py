"""`SlotIndex`: the bookkeeping every backend shares, under the `Index` contract (index.protocol).

A backend stores vectors under *slots* (0, 1, 2, ... in insertion order; a backend may lay them out
anew when it saves: `save(order=)`); this base class maps slots to item ids and keeps per-slot
attributes (category, removed, available, and any declared filter attributes: `attributes`). An
upsert or a removal only marks the old slot dead, so no library ever has to delete in place; the
mask of live-and-available slots is handed to the library (as a bitmap selector where it can take one).

The tables, per slot: the category and attribute codes in the narrowest signed type their values
allow (`Codes`: int8, int16, else int32; -1 is "no value"), the alive and available flags as bitsets
(`BitSet`, 2 bits), and the item id (`SlotIds`). A loaded snapshot's slot -> id table and its id ->
slot lookup (the live slots' (id, slot) pairs sorted by id, `slot_lookup_*.npy`) stay memory-mapped:
read for the rows a search returns and for writes; items inserted since the load get theirs in
memory (`Lookup`: a pair counts while its slot is alive, so a removal or an upsert rewrites no
sorted array).

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
`slot_ids`, `ids_of_slots`, `slot_categories`, `slot_alive`, `slot_returnable`, `slot_attributes`, `slots_of`,
`aligned_slots`, `vectors_of_slots`, `mask_for`, `run_path`, `exact_search_slots`,
`library_search_slots`, `partition_info`, `slot_table_bytes`, `slot_table_layout`,
`slot_table_mapped_bytes`, `load_saved_vectors`.
`exact_search_slots` and `library_search_slots` call `_exact` and `_search`, so every search, from
here or from another module, goes through the one method a backend overrides.
"""

from __future__ import annotations

import functools
import logging
import threading
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from towerann.artifacts import load_npy, save_npy
from towerann.config import ATTRIBUTE_NAME  # a name becomes a file name here: slot_attr_<name>.npy
from towerann.errors import ArtifactError, BadRequest, ConfigError, DataError
from towerann.index import path_choice
from towerann.index.merge import PAD_ID, PAD_SCORE, padded, topk_blocked, topk_rows
from towerann.index.protocol import COMMON_SEARCH, Filter, Index, SearchResult, as_vectors

log = logging.getLogger(__name__)

BY_INDEX_ROWS = 4  # masked brute force for at most this many queries reads the qualifying rows in place


# Whether vectors loaded from a snapshot get room for live adds at once (`load_saved_vectors`): on in a
# serving process (server.wiring), where the first add after a load would otherwise copy the mapped file
# into memory on the event loop (1M x 64-d ScaNN: 0.86 s, every request waiting; the drift benchmark's
# first live item showed it as a ~1 s stall). Off for batch jobs, which map and never grow.
_room_on_load = False
ROOM_CHUNK_BYTES = 8 << 20  # copied a chunk at a time: other threads (the requests) run between chunks


_this_thread = threading.local()  # .no_room: loads on this thread map their vectors whatever room_on_load says


@contextmanager
def without_room() -> Iterator[None]:
    """Loads on this thread leave their vectors mapped even in a serving process: for a copy that is
    searched and never grown (the live re-tune's), room would be memory and a copy for nothing."""
    _this_thread.no_room = True
    try:
        yield
    finally:
        _this_thread.no_room = False


def room_on_load(on: bool = True) -> None:
    """From now on, vectors loaded by `load_saved_vectors(..., grows=True)` are copied into memory with
    room to grow when they load (off the request path), not at the first live add."""
    global _room_on_load
    _room_on_load = on


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Growable:
    """A 1-d or 2-d numpy buffer that grows by doubling, so incremental adds stay amortised O(1)."""

    def __init__(self, data: np.ndarray):
        self._buf = data
        self.n = len(data)

    def make_room(self, extra: int) -> None:
        """Hold the rows in writable memory with room for `extra` more, copying a read-only (mapped)
        buffer a chunk at a time, so that the next `extend` copies nothing."""
        if self._buf.flags.writeable and len(self._buf) >= self.n + extra:
            return
        buf = np.empty((self.n + extra,) + self._buf.shape[1:], self._buf.dtype)
        step = max(1, ROOM_CHUNK_BYTES // max(1, self._buf[:1].nbytes))
        for at in range(0, self.n, step):
            end = min(at + step, self.n)
            buf[at:end] = self._buf[at:end]
        self._buf = buf

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


def code_dtype(lo: int, hi: int) -> np.dtype:
    """The narrowest signed integer type holding codes lo..hi (-1, "no value", included): int8 up to
    127, int16 up to 32767, else int32."""
    for dt in (np.int8, np.int16):
        if np.iinfo(dt).min <= min(lo, -1) and hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int32)


class Codes(Growable):
    """Integer codes per slot (category, filter attributes; -1: no value) in the narrowest signed type
    their values allow, widened in place when a larger code arrives."""

    def __init__(self, data: np.ndarray):
        data = np.asarray(data)
        lo, hi = (int(data.min()), int(data.max())) if len(data) else (-1, -1)
        super().__init__(data.astype(code_dtype(lo, hi), copy=False))

    def _fit(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.int64)
        if len(values):
            dt = code_dtype(int(values.min()), int(values.max()))
            if dt.itemsize > self._buf.dtype.itemsize:
                self._buf = self._buf.astype(dt)
        return values.astype(self._buf.dtype)

    def extend(self, rows: np.ndarray) -> None:
        super().extend(self._fit(rows))

    def assign(self, slots: np.ndarray, values: np.ndarray) -> None:
        """codes[slots] = values (widening first if a value does not fit)."""
        values = self._fit(values)
        if not self._buf.flags.writeable:
            self._buf = self._buf.copy()
        self._buf[slots] = values


class BitSet:
    """One bit per slot, packed little-endian (faiss.IDSelectorBitmap's order), growable; the bits past
    `n` in the last byte stay 0."""

    def __init__(self, bools: np.ndarray | None = None):
        self._bytes = Growable(np.empty(0, np.uint8))
        self.n = 0
        if bools is not None:
            self.extend(bools)

    @classmethod
    def from_bools(cls, bools: np.ndarray, chunk: int = 1 << 24) -> BitSet:
        """Pack a (possibly memory-mapped) bool array a chunk at a time: no full-size temporary."""
        out = cls()
        for at in range(0, len(bools), chunk):  # chunk is a multiple of 8: every part packs whole bytes
            out.extend(np.asarray(bools[at : at + chunk], bool))
        return out

    @property
    def packed(self) -> np.ndarray:
        """The packed bytes, ceil(n / 8) of them (a view: do not write)."""
        return self._bytes.data

    def extend(self, bools: np.ndarray) -> None:
        bools = np.asarray(bools, bool)
        tail = self.n % 8
        if tail:  # the last byte is partial: repack it with the new bits
            last = np.unpackbits(self._bytes.data[-1:], count=tail, bitorder="little").view(bool)
            self._bytes.n -= 1
            bools = np.concatenate([last, bools])
            self.n -= tail
        self._bytes.extend(np.packbits(bools, bitorder="little"))
        self.n += len(bools)

    def get(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, np.int64)
        bits: np.ndarray = (self._bytes.data[slots >> 3] >> (slots & 7).astype(np.uint8)) & 1
        return bits.astype(bool)

    def set(self, slots: np.ndarray, value: bool) -> None:
        slots = np.asarray(slots, np.int64)
        bit = (np.uint8(1) << (slots & 7).astype(np.uint8)).astype(np.uint8)
        if value:
            np.bitwise_or.at(self._bytes.data, slots >> 3, bit)
        else:
            np.bitwise_and.at(self._bytes.data, slots >> 3, ~bit)

    def bools(self) -> np.ndarray:
        """The bits as a bool array of length n (a new array)."""
        return np.unpackbits(self._bytes.data, count=self.n, bitorder="little").view(bool)

    def count(self) -> int:
        return int(np.bitwise_count(self._bytes.data).sum(dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self._bytes.data.nbytes)

    @property
    def allocated_bytes(self) -> int:
        return self._bytes.allocated_bytes


class SlotIds:
    """The item id of each slot: slots [0, n_main) in `main` (a snapshot's slot_ids.npy, memory-mapped
    on a load: read only for the rows a search returns and for writes), later slots in memory."""

    def __init__(self, main: np.ndarray):
        self.main = main
        self.tail = Growable(np.empty(0, np.int64))

    @property
    def n(self) -> int:
        return len(self.main) + self.tail.n

    @property
    def data(self) -> np.ndarray:
        """Every slot's id: `main` itself while nothing was added, the in-memory table (a view) while
        `main` is empty (a fresh build), else a new array (use `take` for a few rows)."""
        if not self.tail.n:
            return np.asarray(self.main)
        if not len(self.main):
            return self.tail.data
        return np.concatenate([self.main, self.tail.data])

    def take(self, slots: np.ndarray) -> np.ndarray:
        """ids[slots] as a new int64 array (any shape; -1 slots give an arbitrary id: the caller masks them)."""
        slots = np.asarray(slots, np.int64)
        n_main = len(self.main)
        # take(mode="clip") spares a clipped copy of the slots, and a fresh build's one table needs no split
        # by table: that split was 17 us of a ~250 us one-query HNSW search under a profiler
        if not self.tail.n:
            return np.asarray(self.main.take(slots, mode="clip"), np.int64) if n_main else slots.copy()
        if not n_main:  # a fresh build: every id is in the tail
            ids: np.ndarray = self.tail.data.take(slots, mode="clip")
            return ids
        out = np.empty(slots.shape, np.int64)
        in_main = slots < n_main
        if n_main:
            out[in_main] = self.main[np.clip(slots[in_main], 0, None)]
        out[~in_main] = self.tail.data[slots[~in_main] - n_main]
        return out

    def extend(self, ids: np.ndarray) -> None:
        self.tail.extend(np.asarray(ids, np.int64))

    @property
    def mapped(self) -> bool:
        return _is_mapped(self.main)

    def resident_bytes(self, allocated: bool = False) -> int:
        tail = self.tail.allocated_bytes if allocated else self.tail.data.nbytes
        return int(tail + (0 if self.mapped else self.main.nbytes))


def advise_random(arr: np.ndarray) -> None:
    """madvise(MADV_RANDOM) over the file mapping under `arr`: a read faults in its own page only (no
    read-around, no mapping of its cached neighbours), for tables read a row here and there."""
    import mmap as _mmap

    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, _mmap.mmap):
        view = np.frombuffer(base, np.uint8)
        madvise_pages(view, _mmap.PAGESIZE, (1,))  # 1 = MADV_RANDOM (Linux)
        del view


def _is_mapped(arr: np.ndarray) -> bool:
    """Whether the array's memory is a file mapping (np.load(mmap_mode=...)), not the process's own."""
    import mmap as _mmap

    base: object = arr
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return True
        base = base.base
    return isinstance(base, _mmap.mmap)


@dataclass
class Lookup:
    """id -> slot: the snapshot's sorted (id, slot) pairs of its live slots (memory-mapped on a load),
    and the pairs of items inserted since (in memory, sorted, one pair per id: the newest). A pair
    counts only while its slot is alive, so a removal or an upsert changes no sorted array."""

    ids: np.ndarray
    slots: np.ndarray
    new_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    new_slots: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def find(self, ids: np.ndarray, alive: BitSet) -> np.ndarray:
        """The live slot of each id, -1 where none."""
        out = np.full(len(ids), -1, np.int64)
        for keys, vals in ((self.ids, self.slots), (self.new_ids, self.new_slots)):  # the newer pairs last
            if not len(keys) or not len(ids):
                continue
            pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            slot = np.where(keys[pos] == ids, np.asarray(vals[pos], np.int64), -1)
            live = slot >= 0
            live[live] = alive.get(slot[live])
            out = np.where(live, slot, out)
        return out

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        keep = ~np.isin(self.new_ids, ids)
        keys = np.concatenate([self.new_ids[keep], ids])
        order = np.argsort(keys, kind="stable")
        self.new_ids = keys[order]
        self.new_slots = np.concatenate([self.new_slots[keep], slots])[order]

    def resident_bytes(self) -> int:
        main = 0 if _is_mapped(self.ids) else self.ids.nbytes + self.slots.nbytes
        return int(main + self.new_ids.nbytes + self.new_slots.nbytes)

    def disk_bytes(self) -> int:
        return int(self.ids.nbytes + self.slots.nbytes) if _is_mapped(self.ids) else 0


class Mask:
    """Slots that may be returned for one (filter, index state); conversions are computed once.

    Made from a bool array (`bits`) or from packed bits (`from_packed`: the other form is made only
    when asked for, so a mask that only reaches a bitmap selector costs n/8 bytes)."""

    def __init__(
        self,
        bits: np.ndarray | None = None,
        count: int | None = None,
        _packed: np.ndarray | None = None,
        _idx: np.ndarray | None = None,
        n: int | None = None,
    ):
        self._bits = bits
        self._packed = _packed
        self._idx = _idx
        if bits is not None:
            self.n = len(bits)
            self.count = int(bits.sum()) if count is None else int(count)
        elif _packed is not None:
            self.n = int(n) if n is not None else 8 * len(_packed)
            self.count = int(np.bitwise_count(_packed).sum(dtype=np.int64)) if count is None else int(count)
        else:
            raise ValueError("Mask needs bits or packed bits")

    @property
    def bits(self) -> np.ndarray:
        """bool [n_slots]."""
        if self._bits is None:
            packed: np.ndarray = self._packed  # type: ignore[assignment]  # one of the two is always set
            self._bits = np.unpackbits(packed, count=self.n, bitorder="little").view(bool)
        return self._bits

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

    @classmethod
    def from_packed(cls, packed: np.ndarray, n_slots: int, count: int | None = None) -> Mask:
        return cls(_packed=packed, n=n_slots, count=count)


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


def top_inner_products(q: np.ndarray, vecs: np.ndarray, k: int, first_label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best rows of `vecs` by inner product, best first: (row + first_label int64 [m, k],
    scores float32 [m, k]), -1/-inf padded. One pass over the rows keeping a heap (faiss; one thread a
    query): for a query or two, a gemv then an argpartition over every row cost 2-3x more (a 200k x 64-d
    delta tier: 7-9 ms against 3.4 ms)."""
    import faiss

    q = np.ascontiguousarray(q, np.float32)
    vecs = np.ascontiguousarray(vecs, np.float32)
    m, n = len(q), len(vecs)
    ids, scores = padded(m, k)
    kk = min(k, n)
    if kk == 0 or m == 0:
        return ids, scores
    got_scores = np.empty((m, kk), np.float32)
    got_rows = np.empty((m, kk), np.int64)
    faiss.knn_inner_product(
        faiss.swig_ptr(q),
        faiss.swig_ptr(vecs),
        vecs.shape[1],
        m,
        n,
        kk,
        faiss.swig_ptr(got_scores),
        faiss.swig_ptr(got_rows),
    )
    found = got_rows >= 0
    ids[:, :kk] = np.where(found, got_rows + first_label, PAD_ID)
    scores[:, :kk] = np.where(found, got_scores, PAD_SCORE)
    return ids, scores


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
        self._ids = SlotIds(np.empty(0, np.int64))  # id per slot (a loaded snapshot's: memory-mapped)
        self._cats = Codes(np.empty(0, np.int8))  # category per slot (-1: none), as narrow as the codes allow
        self._attrs: dict[str, Codes] = {}  # filter attribute -> code per slot (-1: none), narrow too
        self._alive = BitSet()  # False once removed or replaced
        self._avail = BitSet()  # availability flag (reversible)
        self._n_ok = 0  # slots alive and available: may be returned
        self._n_alive = 0
        self._lookup = Lookup(np.empty(0, np.int64), np.empty(0, np.int64))  # id -> live slot
        self._gen = 0  # bumped on every mutation; invalidates cached masks
        self._masks: dict[Any, Mask] = {}
        self._flag_cache: dict[str, tuple[int, np.ndarray]] = {}  # bool forms of the bitsets, per generation

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
        if self.n_slots:
            raise ConfigError(
                f"{self.kind} index already holds {self.n_slots} slots; build() needs a fresh index "
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
        self._insert(vectors, ids, categories, available, build=self.n_slots == 0, attributes=attributes)

    @property
    def attribute_names(self) -> list[str]:
        return sorted(self._attrs)

    def attribute_codes(self, ids: Any) -> dict[str, np.ndarray]:
        """{attribute: int32 code per id} of live items (-1 for unknown ids or no value)."""
        hit, slots = self.aligned_slots(ids)
        out = {name: np.full(len(hit), -1, np.int32) for name in self._attrs}  # int32 out, whatever the table holds
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
                self._attrs[name] = Codes(np.full(self.n_slots, -1, np.int8))
            self._attrs[name].assign(slots, codes[hit])
        self._gen += 1

    def remove(self, ids: Any) -> None:
        """Delete items for good. Unknown ids are ignored (removal is idempotent)."""
        slots = self.slots_of(ids)
        if not len(slots):
            return
        ok_before = int(self._avail.get(slots).sum())  # they were alive: these were returnable
        self._alive.set(slots, False)
        self._died(slots, ok_before)

    def set_available(self, ids: Any, available: bool) -> None:
        """Hide (False) or show again (True) items without removing them. Unknown ids are ignored."""
        slots = self.slots_of(ids)
        if len(slots):  # live slots: returnable exactly when available
            before = int(self._avail.get(slots).sum())
            self._avail.set(slots, bool(available))
            self._n_ok += int(self._avail.get(slots).sum()) - before
            self._gen += 1

    def __len__(self) -> int:
        return self._n_alive

    def __contains__(self, item_id: int) -> bool:
        return len(self.slots_of([item_id])) > 0

    @property
    def n_slots(self) -> int:
        """Slots stored, dead ones included (what a rebuild would reclaim)."""
        return self._alive.n

    def search(
        self, queries: Any, k: int, filter: Filter | None = None, params: dict[str, Any] | None = None
    ) -> SearchResult:
        q = as_vectors(queries, self.dim, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadRequest(f"k must be a positive integer, got {k!r}")
        k = int(k)
        p = self.search_defaults if not params else self._merge_params(params)
        mask = self.mask_for(filter)
        n_qual = self.n_slots if mask is None else mask.count
        if n_qual == 0:
            ids, scores = padded(len(q), k)
            return SearchResult(ids=ids, scores=scores)
        filtered = filter is not None and not filter.empty
        path = None if mask is None else path_choice.choose(n_qual, mask.n, k, p, filtered, self.filter_paths)
        slots, scores, exact_rows, short_rows = self.run_path(q, k, p, mask, path)
        ids = self._ids.take(slots)
        ids[slots < 0] = -1
        return SearchResult(ids=ids, scores=scores, exact_rows=exact_rows, short_rows=short_rows)

    def exact_search(self, queries: Any, k: int, filter: Filter | None = None) -> SearchResult:
        """Brute force over the same qualifying items: the ground truth for recall, on any backend."""
        q = as_vectors(queries, self.dim, "queries")
        mask = self.mask_for(filter)
        if (self.n_slots if mask is None else mask.count) == 0:
            ids, scores = padded(len(q), int(k))
            return SearchResult(ids=ids, scores=scores)
        slots, scores = self._exact(q, int(k), mask)
        ids = self._ids.take(slots)
        ids[slots < 0] = -1
        return SearchResult(ids=ids, scores=scores)

    # ---- slot hooks: what the filter planner, partitions and backends read ---------------------------
    @property
    def slot_ids(self) -> np.ndarray:
        """The item id of each slot, dead slots included (do not write: a loaded snapshot's table is
        memory-mapped, and a new array once items were added since)."""
        return self._ids.data

    def ids_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """The item id of each of `slots` (any shape; -1 for slot -1), read row by row (no full table)."""
        slots = np.asarray(slots, np.int64)
        ids = self._ids.take(slots)
        ids[slots < 0] = -1
        return ids

    @property
    def slot_categories(self) -> np.ndarray:
        """The category code of each slot (-1: none; int8, int16 or int32, as narrow as the codes
        allow; a view: do not write)."""
        return self._cats.data

    @property
    def slot_alive(self) -> np.ndarray:
        """Per slot: not removed or replaced (bool, made from the bitset once per change: do not write)."""
        return self._flags("alive")

    @property
    def slot_returnable(self) -> np.ndarray:
        """Per slot: alive and available, so a search may return it (bool, made once per change: do not write)."""
        return self._flags("ok")

    @property
    def slot_attributes(self) -> dict[str, np.ndarray]:
        """{filter attribute: code per slot (-1: no value; narrow like slot_categories)} (views: do not write)."""
        return {name: table.data for name, table in self._attrs.items()}

    def slots_of(self, ids: Any) -> np.ndarray:
        """Live slots of the given ids, sorted and unique (unknown ids skipped)."""
        ids = np.atleast_1d(np.asarray(ids))
        if not np.issubdtype(ids.dtype, np.integer) and len(ids):
            raise BadRequest(f"ids must be integers, got dtype {ids.dtype}")
        slots = self._lookup.find(ids.astype(np.int64), self._alive)
        return np.unique(slots[slots >= 0])

    def aligned_slots(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(found: bool per id, the live slot of each found id, in the ids' order)."""
        ids = np.atleast_1d(np.asarray(ids, np.int64))
        slots = self._lookup.find(ids, self._alive)
        hit = slots >= 0
        return hit, slots[hit]

    def vectors_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """The stored vectors of `slots`, [len(slots), dim] (a copy)."""
        vectors: np.ndarray = self._vectors()[slots]
        return vectors

    def slot_table_bytes(self, allocated: bool = False) -> int:
        """Bytes the process holds for the slot tables (ids added since the load, categories, flag
        bitsets, attributes) and the id -> slot lookup: in use, or `allocated` (the growable tables keep
        spare capacity). Memory-mapped tables (a loaded snapshot's ids and lookup) are the page cache's."""
        codes = (self._cats, *self._attrs.values())
        used = sum(t.allocated_bytes if allocated else t.data.nbytes for t in codes)
        flags = sum(b.allocated_bytes if allocated else b.nbytes for b in (self._alive, self._avail))
        return int(used + flags + self._ids.resident_bytes(allocated) + self._lookup.resident_bytes())

    def slot_table_mapped_bytes(self) -> int:
        """Bytes of the tables memory-mapped from the loaded snapshot (ids, lookup): the page cache's."""
        return int((self._ids.main.nbytes if self._ids.mapped else 0) + self._lookup.disk_bytes())

    def slot_table_layout(self) -> dict[str, dict[str, int]]:
        """What a fresh load of this index's snapshot holds per table: {table: {"resident": bytes in the
        process, "mapped": bytes memory-mapped from the snapshot (read only for the rows a search
        returns and for writes)}}."""
        n, live = self.n_slots, len(self)
        out = {
            "ids": {"resident": 0, "mapped": 8 * n},
            "lookup": {"resident": 0, "mapped": 16 * live},
            "categories": {"resident": n * code_dtype(*_bounds(self._cats.data)).itemsize, "mapped": 0},
            "flags": {"resident": 2 * -(-n // 8), "mapped": 0},
        }
        for name, table in self._attrs.items():
            out[f"attr_{name}"] = {"resident": n * code_dtype(*_bounds(table.data)).itemsize, "mapped": 0}
        return out

    def mask_for(self, filter: Filter | None) -> Mask | None:
        """The slots a search may return, or None when every slot may be (the lean hot path)."""
        if filter is not None and filter.empty:
            filter = None
        if filter is None and self._n_ok == self.n_slots:
            return None
        key = (self._gen, filter)
        mask = self._masks.get(key)
        if mask is None:
            # The cache is read from more than one thread (requests, the recall monitor): a copy of its
            # keys, not an iterator over the live dict, which another thread's insert would break.
            keys = list(self._masks)
            if len(keys) > 64 or (keys and keys[0][0] != self._gen):
                self._masks = {}
            if filter is None:  # removed or hidden slots only: the packed bits straight from the bitsets
                packed = self._alive.packed & self._avail.packed
                mask = self._masks[key] = Mask.from_packed(packed, self.n_slots, count=self._n_ok)
                return mask
            conditions: list[tuple[Codes, Any]] = [] if filter.categories is None else [(self._cats, filter.categories)]
            for name, codes in filter.attributes:
                if name not in self._attrs:
                    raise BadRequest(
                        f"filter: the {self.kind} index has no attribute {name!r}; it has "
                        f"{self.attribute_names or 'none'} (declare it in [filters] attributes)"
                    )
                conditions.append((self._attrs[name], codes))
            bits = self._flags("ok") if self._n_ok < self.n_slots else np.ones(self.n_slots, bool)
            for table, codes in conditions:  # AND across conditions, OR within each value set
                bits = bits & np.isin(table.data, np.fromiter(codes, np.int64, len(codes)))
            mask = self._masks[key] = Mask(bits=bits, count=int(bits.sum()))
        return mask

    def run_path(
        self, q: np.ndarray, k: int, p: dict[str, Any], mask: Mask | None, path: str | None
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """One search along a planned path (None: unmasked, or the backend's own choice); returns
        (slots, scores, exact_rows, short_rows). Rows the library leaves short go exact."""
        n_qual = self.n_slots if mask is None else mask.count
        if n_qual <= k or path == "exact":
            slots, scores = self._exact(q, k, mask)
            return slots, scores, len(q), 0
        if mask is not None:
            p = {**p, "filter_path": path or "auto"}
        slots, scores = self._search(q, k, p, mask)
        short = slots[:, k - 1] < 0  # at least k qualify, so a short row is the library's shortfall
        n_short = int(np.count_nonzero(short))
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
        first = self.n_slots
        self._add_vectors(v, first, build)  # the library first: if it fails, the tables stay consistent
        if len(old):  # upsert: the old slots die
            ok_before = int(self._avail.get(old).sum())
            self._alive.set(old, False)
            self._died(old, ok_before)
        self._ids.extend(ids)
        self._cats.extend(cats.astype(np.int32))
        for name in attrs.keys() - self._attrs.keys():  # a new attribute: no value for the slots before
            self._attrs[name] = Codes(np.full(first, -1, np.int8))
        for name, table in self._attrs.items():
            table.extend(attrs[name] if name in attrs else np.full(n, -1, np.int32))
        self._alive.extend(np.ones(n, bool))
        self._avail.extend(avail)
        self._n_ok += int(avail.sum())
        self._n_alive += n
        self._lookup.insert(ids, np.arange(first, first + n, dtype=np.int64))
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

    def _died(self, slots: np.ndarray, ok_before: int) -> None:
        """Counts after live `slots` (of which `ok_before` were available) were marked dead."""
        self._n_alive -= len(slots)
        self._n_ok -= ok_before
        self._gen += 1

    def _flags(self, which: str) -> np.ndarray:
        """The alive ("alive") or alive-and-available ("ok") bits as bool, made once per generation."""
        hit = self._flag_cache.get(which)
        if hit is not None and hit[0] == self._gen:
            return hit[1]
        if which == "alive":
            bits = self._alive.bools()
        else:
            bits = np.unpackbits(self._alive.packed & self._avail.packed, count=self.n_slots, bitorder="little")
            bits = bits.view(bool)
        self._flag_cache = {k: v for k, v in self._flag_cache.items() if v[0] == self._gen}
        self._flag_cache[which] = (self._gen, bits)
        return bits

    # ---- persistence ---------------------------------------------------------------------------
    def load_saved_vectors(self, directory: Path, name: str, grows: bool = False) -> Growable:
        """A backend's saved full vectors (for its `_load_backend`), memory-mapped (copied into memory
        only if items are added), checked against the slot count and dim of the manifest. `grows`: a
        backend whose live adds extend this array; in a serving process (`room_on_load`) it is copied into
        memory with room to grow now, unless that is more than a quarter of the memory available."""
        vecs = load_npy(directory / name, mmap=True)
        if vecs.shape != (self.n_slots, self.dim) or vecs.dtype != np.float32:
            raise ArtifactError(
                f"{directory / name}: {vecs.dtype}{list(vecs.shape)} does not match "
                f"float32[{self.n_slots}, {self.dim}] in the manifest"
            )
        out = Growable(vecs)
        if grows and _room_on_load and not getattr(_this_thread, "no_room", False):
            available = available_memory_bytes()
            if available is not None and vecs.nbytes > available / 4:
                log.info(
                    "%s: vectors left mapped (%.1f GB, %.1f GB available): the first live add copies them",
                    self.kind,
                    vecs.nbytes / 1e9,
                    available / 1e9,
                )
            else:
                out.make_room(max(len(vecs) // 8, 1024))
        return out

    def save(self, directory: Path, order: np.ndarray | None = None) -> dict[str, Any]:
        """Write the index files into `directory` (which must exist); return the manifest fields.

        `order`: every slot once, in the order the snapshot stores them (a backend that lays its slots
        out anew on a save, as ivfpq does in inverted-list order; its `_save_backend` writes its own
        files in the same order); None: as they are. Besides the tables, the id -> slot lookup of the
        live slots is written sorted by id (slot_lookup_*.npy), so a load maps it instead of sorting."""
        directory = Path(directory)

        def laid(a: np.ndarray) -> np.ndarray:
            return a if order is None else a[order]

        ids = laid(self._ids.data)
        alive = laid(self._alive.bools())
        for name, arr in (
            ("ids", ids),
            ("categories", narrowed_codes(laid(self._cats.data))),
            ("alive", alive),
            ("available", laid(self._avail.bools())),
        ):
            save_npy(directory / f"slot_{name}.npy", arr)
        for name, table in self._attrs.items():
            save_npy(directory / f"slot_attr_{name}.npy", narrowed_codes(laid(table.data)))
        live = np.flatnonzero(alive)
        by_id = np.argsort(ids[live], kind="stable")
        save_npy(directory / LOOKUP_FILES[0], ids[live][by_id])
        save_npy(directory / LOOKUP_FILES[1], live[by_id].astype(np.int64))
        del ids, alive, live, by_id
        backend = self._save_backend(directory)
        return {
            "backend": self.kind,
            "build_params": self.build_params,
            "description": self.describe(),
            "dim": self.dim,
            "metric": self.metric,
            "count": len(self),
            "slots": self.n_slots,
            "slot_lookup": list(LOOKUP_FILES),
            "search_defaults": self.search_defaults,
            "tuning": self.tuning,
            "filter_calibration": self.filter_calibration,
            "attributes": self.attribute_names,
            "backend_state": backend,
        }

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> Self:
        """Rebuild an index from `save`'s files; checksums are checked by the snapshot layer.

        The slot -> id table and the id -> slot lookup are memory-mapped (a snapshot written before the
        lookup files existed gets its lookup sorted into memory, as before); categories, attributes
        and the flags are read into memory, narrowed (codes) and packed (flags)."""
        directory = Path(directory)
        try:
            index = cls(int(manifest["dim"]), manifest["metric"], **manifest["build_params"])
            index.search_defaults = {**COMMON_SEARCH, **manifest["search_defaults"]}
            index.tuning = manifest.get("tuning")
            index.filter_calibration = manifest.get("filter_calibration")
            n = int(manifest["slots"])
            state = manifest["backend_state"]
            attr_names = [str(a) for a in manifest.get("attributes") or []]
            lookup_files = [str(f) for f in manifest.get("slot_lookup") or []]
            path_choice.check_table(index.search_defaults["filter_plan"])
        except (KeyError, TypeError, ValueError, BadRequest) as e:
            raise ArtifactError(f"{directory}: index manifest is missing or has a bad field ({e})") from e
        bad = [a for a in attr_names if not ATTRIBUTE_NAME.match(a)]
        if bad:
            raise ArtifactError(f"{directory}: manifest lists attributes {bad}, which are not attribute names")
        if lookup_files and lookup_files != list(LOOKUP_FILES):
            raise ArtifactError(
                f"{directory}: manifest lists lookup files {lookup_files}, expected {list(LOOKUP_FILES)}"
            )
        names = ("ids", "categories", "alive", "available", *(f"attr_{a}" for a in attr_names))
        tables = {name: load_npy(directory / f"slot_{name}.npy", mmap=True) for name in names}
        for name, arr in tables.items():
            kind = "b" if name in ("alive", "available") else "i"
            if arr.shape != (n,) or arr.dtype.kind != kind:
                raise ArtifactError(
                    f"{directory / f'slot_{name}.npy'}: {arr.dtype}{list(arr.shape)} does not match {n} slots "
                    f"of {'bool' if kind == 'b' else 'integer'} in the manifest"
                )
        ids = tables["ids"]
        index._ids = SlotIds(np.asarray(ids) if ids.dtype == np.int64 else np.array(ids, np.int64))
        advise_random(index._ids.main)
        index._cats = Codes(np.array(tables["categories"]))
        index._alive = BitSet.from_bools(tables["alive"])
        index._avail = BitSet.from_bools(tables["available"])
        index._attrs = {a: Codes(np.array(tables[f"attr_{a}"])) for a in attr_names}
        del tables
        index._n_alive = index._alive.count()
        index._n_ok = int(np.bitwise_count(index._alive.packed & index._avail.packed).sum(dtype=np.int64))
        if lookup_files:
            keys, slots = (np.asarray(load_npy(directory / f, mmap=True)) for f in lookup_files)
            if keys.shape != (index._n_alive,) or slots.shape != keys.shape or keys.dtype != np.int64:
                raise ArtifactError(
                    f"{directory}: the id lookup holds {keys.dtype}{list(keys.shape)} / "
                    f"{slots.dtype}{list(slots.shape)}, not int64 pairs for the {index._n_alive} live slots"
                )
            index._lookup = Lookup(keys, slots)
            advise_random(keys)
            advise_random(slots)
        else:  # a snapshot from before the lookup files: sort it here, in memory
            live = np.flatnonzero(index._alive.bools())
            order = np.argsort(index._ids.main[live], kind="stable")
            index._lookup = Lookup(np.asarray(index._ids.main[live[order]], np.int64), live[order].astype(np.int64))
        index._load_backend(directory, state)
        return index


LOOKUP_FILES = ("slot_lookup_ids.npy", "slot_lookup_slots.npy")


def _bounds(codes: np.ndarray) -> tuple[int, int]:
    return (int(codes.min()), int(codes.max())) if len(codes) else (-1, -1)


def narrowed_codes(codes: np.ndarray) -> np.ndarray:
    """Codes in the narrowest type their values allow (what a load would hold)."""
    return codes.astype(code_dtype(*_bounds(codes)), copy=False)

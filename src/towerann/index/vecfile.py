"""Full vectors kept for re-ranking: the built catalog in files on disk, the items added since in memory.

A compressed index holds codes in RAM and needs a full vector only for the short list it re-ranks.
`RerankVectors` keeps the saved catalog as memory-mapped .npy files (the kernel's page cache decides
what stays resident, not the process) and rows added after the load in an in-memory buffer, so a
live add never copies a whole file into RAM. Two files, both in the snapshot's slot order (which
ivfpq makes its inverted-list order, so the rows of one list are neighbours on disk):

- vectors.npy, float32: exact search (ground truth, exact fallbacks) and, with rerank_dtype
  "float32" (the default), the re-ranking;
- rerank.npy with rerank_dtype "float16" (2 bytes a dimension) or "int8" (1 byte a dimension plus a
  float32 scale per vector, in one row): the re-ranking reads only this file. A re-rank score is the
  inner product with the stored (rounded) vector; rows kept in memory (a fresh build, items added
  since a load) are rounded the same way before scoring, so every tier gives the same bits.

Reads of a short list from a file go out as a few large reads: the rows on pages this process has
not read since the last eviction are grouped into runs of nearby pages (a list's rows are one run)
and each run is prefetched with one madvise(MADV_WILLNEED) before the rows are gathered, so the
disk sees about one request per probed list, all in flight at once, instead of one per row. The
mapping is advised MADV_RANDOM, so a fault outside a prefetched run reads its own page only.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import faiss
import numpy as np

from towerann.artifacts import sha256_file
from towerann.errors import ConfigError
from towerann.index.base import Growable, inner_products, madvise_pages
from towerann.index.merge import merge_topk, padded, topk_blocked

RERANK_DTYPES = ("float32", "float16", "int8")
MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED = 1, 3, 4  # Linux
RUN_GAP = 16  # unread pages at most this far apart are read as one run (a 64 KB gap costs less than a request)
WRITE_ROWS = 1 << 16  # rows gathered per block when a file is written
DECODE_ROWS = 1024  # float16/int8 rows decoded per block when re-ranking (512 KB of float32 at 128-d)
EXACT_ROWS = 1 << 18  # rows decoded per block by exact search without a float32 copy (128 MB of float32 at 128-d)


def check_dtype(dtype: str) -> str:
    if dtype not in RERANK_DTYPES:
        raise ConfigError(f"rerank_dtype={dtype!r}: expected one of {', '.join(RERANK_DTYPES)}")
    return dtype


def row_format(dtype: str, dim: int) -> tuple[np.dtype, int]:
    """(numpy dtype, columns) of one stored re-rank row: float32/float16 [dim]; int8: dim code bytes
    then the row's float32 scale, as uint8 [dim + 4]."""
    if dtype == "int8":
        return np.dtype(np.uint8), dim + 4
    return np.dtype(dtype), dim


def encode(rows: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows [c, dim] as stored for re-ranking in `dtype`."""
    if dtype == "float32":
        return np.ascontiguousarray(rows, np.float32)
    if dtype == "float16":
        return rows.astype(np.float16)
    # int8, per vector: codes = round(v / scale), scale = max|v| / 127 (1 for an all-zero row)
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    out = np.empty((len(rows), rows.shape[1] + 4), np.uint8)
    out[:, :-4] = codes.view(np.uint8)
    out[:, -4:] = scale.view(np.uint8).reshape(-1, 4)
    return out


def decode(stored: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 rows [c, dim], per-row scale or None): a score is the rows' inner product x scale."""
    if dtype == "int8":
        rows = np.ascontiguousarray(stored[:, :-4]).view(np.int8).astype(np.float32)
        return rows, np.ascontiguousarray(stored[:, -4:]).view(np.float32).reshape(-1)
    return np.ascontiguousarray(stored, np.float32), None


def _inner_products_by_idx(q: np.ndarray, vecs: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """[m, c] inner products of q[i] with vecs[slots[i, j]], in faiss' C++ loop (no [m, c, dim] gather
    in numpy; the GIL is released); -1 slots score -inf."""
    slots = np.ascontiguousarray(slots, np.int64)
    out = np.empty(slots.shape, np.float32)
    if not len(vecs):  # nothing to point into: every slot is -1 here
        out.fill(-np.inf)
        return out
    q = np.ascontiguousarray(q, np.float32)
    faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]
        faiss.swig_ptr(out),
        faiss.swig_ptr(q),
        faiss.swig_ptr(vecs),
        faiss.swig_ptr(slots),
        vecs.shape[1],
        len(q),
        slots.shape[1],
    )
    return out


def _decoded_rows(stored: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows [c, dim] of stored re-rank rows (int8: codes times their scale)."""
    rows, scale = decode(stored, dtype)
    return rows if scale is None else rows * scale[:, None]


_FP16_BLOCKS = threading.local()  # per thread: a float16 scalar-quantizer index whose codes buffer is reused


def _fp16_block(rows: np.ndarray) -> faiss.IndexScalarQuantizer:
    """This thread's float16 scalar quantizer holding a copy of `rows` [c, dim] as its codes (valid until
    the thread's next call). The buffer only grows: a new 64 MB one per exact-search block was zero-filled
    and page-faulted each time, twice the block's search (profiled in a 10M-item server's recall monitor)."""
    dim = rows.shape[1]
    block = getattr(_FP16_BLOCKS, "index", None)
    if block is None or block.d != dim:
        block = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        _FP16_BLOCKS.index = block
    codes = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
    if block.codes.size() < codes.nbytes:
        block.codes.resize(codes.nbytes)
    faiss.memcpy(block.codes.data(), faiss.swig_ptr(codes), codes.nbytes)
    block.ntotal = len(rows)  # searches read ntotal rows, whatever the buffer's size
    return block


def _fp16_block_topk(
    q: np.ndarray, k: int, stored: np.ndarray, bits: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (block rows, scores) of float16 rows [c, dim] for queries q (bits: the rows that may be
    returned), scored in faiss (a float16 scalar quantizer: its codes are these rows' bytes) with the
    GIL released. numpy's decode to float32 then a matmul took 3.5x as long, under the GIL between
    its steps: at 10M items the recall monitor's exact search ran for tens of seconds beside the
    requests and raised their p99 at 100 requests/s from 26 to 74 ms."""
    block = _fp16_block(stored)
    params = None
    if bits is not None:
        packed = np.packbits(bits, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(packed))  # both kept alive until the search
        params = faiss.SearchParameters()
        params.sel = selector
    kk = min(k, len(stored))
    scores, rows = block.search(np.ascontiguousarray(q, np.float32), kk, params=params)
    out_ids, out_scores = padded(len(q), k)
    out_ids[:, :kk], out_scores[:, :kk] = rows, np.where(rows >= 0, scores, -np.inf)
    return out_ids, out_scores


def _fp16_scores(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Scores [c] of one query [1, dim] against float16 rows [c, dim], in faiss' float16 scalar quantizer
    (converted in SIMD registers), as exact search over float16 rows scores them: decoding to float32
    first took 0.6 ms of a 10M-item K=1000 search's 2.2 (2000 rows; numpy has no SIMD float16 cast here)."""
    out = np.full(len(stored), -np.inf, np.float32)
    if len(stored):
        scores, rows = _fp16_block(stored).search(np.ascontiguousarray(query, np.float32), len(stored))
        found = rows[0] >= 0  # all of them, unless a row scores NaN (faiss then leaves its place -1)
        out[rows[0][found]] = scores[0][found]
    return out


def score_stored(query: np.ndarray, stored: np.ndarray, dtype: str) -> np.ndarray:
    """Scores [c] of one query [1, dim] against stored rows [c, ...] of `dtype`, whichever tier the rows
    came from: float16, faiss' float16 scalar quantizer; else each one faiss inner product of two
    float32 rows (times the row's scale for int8)."""
    if dtype == "float16":
        return _fp16_scores(query, stored)
    rows, scale = decode(stored, dtype)
    out: np.ndarray = _inner_products_by_idx(query, rows, np.arange(len(rows), dtype=np.int64)[None, :])[0]
    return out if scale is None else out * scale


def _mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The mmap under a memory-mapped array (np.load(mmap_mode=...)), or None for an in-memory one."""
    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) else None


class MappedRows:
    """A memory-mapped 2-d .npy array whose rows are read in runs (see the module docstring), with the
    pages read since the last eviction remembered (1 byte a page), so warm reads make no system call."""

    def __init__(self, arr: np.ndarray, path: Path):
        m = _mapping(arr)
        if m is None:
            raise ValueError("MappedRows needs a memory-mapped array")
        self.path = path
        self.rows = np.asarray(arr)  # a plain ndarray view: its gathers skip np.memmap's wrapping
        mapping = np.frombuffer(m, np.uint8)
        madvise_pages(mapping, mmap.PAGESIZE, (MADV_RANDOM,))
        self._base = mapping.ctypes.data
        self._offset = self.rows.ctypes.data - self._base  # the .npy header, before row 0
        self._row_bytes = int(self.rows.strides[0]) if len(self.rows) else 1
        self._seen = np.zeros(-(-len(mapping) // mmap.PAGESIZE), bool)
        del mapping

    def prefetch(self, slots: np.ndarray) -> int:
        """Start reading the pages of rows `slots` not read since the last eviction, one madvise per
        run of nearby pages; return the runs requested. The gather that follows waits for them."""
        if not len(slots):
            return 0
        slots = np.asarray(slots, np.int64)
        first = (self._offset + slots * self._row_bytes) // mmap.PAGESIZE
        last = (self._offset + (slots + 1) * self._row_bytes - 1) // mmap.PAGESIZE
        unread = ~(self._seen[first] & self._seen[last])
        if not unread.any():
            return 0
        lo, hi = np.sort(first[unread]), np.sort(last[unread])
        cut = np.flatnonzero(lo[1:] > hi[:-1] + RUN_GAP) + 1
        starts, ends = lo[np.r_[0, cut]], hi[np.r_[cut - 1, len(hi) - 1]]
        libc = _libc()
        for s, e in zip(starts.tolist(), ends.tolist()):
            libc.madvise(
                ctypes.c_void_p(self._base + s * mmap.PAGESIZE),
                ctypes.c_size_t((e - s + 1) * mmap.PAGESIZE),
                MADV_WILLNEED,
            )
            self._seen[s : e + 1] = True  # benign races: concurrent searches only ever set flags
        return len(starts)

    def warm(self) -> None:
        """Read the whole file once (a byte a page): what a server that has run a while sees."""
        view = np.frombuffer(cast(mmap.mmap, _mapping(self.rows)), np.uint8)
        step = 1 << 28  # 256 MB at a time
        for at in range(0, len(view), step):
            int(view[at : at + step : mmap.PAGESIZE].sum())
        del view
        self._seen[:] = True

    def evict(self) -> None:
        """Drop the file's pages from this process and from the page cache (changes no system setting)."""
        evict_mapping(self.rows, self.path)
        self._seen[:] = False

    @property
    def seen_bytes(self) -> int:
        return int(self._seen.nbytes)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def evict_mapping(arr: np.ndarray, path: Path) -> None:
    """Drop a mapped file's pages from this process (madvise DONTNEED) and from the page cache."""
    m = _mapping(arr)
    if m is not None:
        view = np.frombuffer(m, np.uint8)  # the mapping, page-aligned; its last page may be partial
        whole = -(-len(view) // mmap.PAGESIZE) * mmap.PAGESIZE
        _libc().madvise(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(whole), MADV_DONTNEED)
        del view
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # then the cache can let them go
    finally:
        os.close(fd)


class RerankVectors:
    """Vectors by slot: slots [0, n_main) in `main` (float32: a memory-mapped file, or an array of a
    fresh build), later slots in an in-memory tier; re-ranked from `rerank` (the stored rows of
    `dtype`, mapped or in memory) where given, else from `main` (float32, or rounded to `dtype` on
    the fly: the same values the file would hold).

    main=None (a snapshot saved without its float32 file, ivfpq keep_float32=False): the re-rank rows
    are the only copy of the catalog's vectors, and exact search scores them too (decoded a block of
    rows at a time): it is exact over the stored, rounded vectors."""

    def __init__(
        self,
        main: np.ndarray | None,
        path: Path | None = None,
        dtype: str = "float32",
        rerank: np.ndarray | None = None,
        rerank_path: Path | None = None,
    ):
        self.path = path  # the file `main` maps (None: in memory, or no float32 file)
        self.dtype = check_dtype(dtype)
        if main is None:
            if rerank is None or self.dtype == "float32":
                raise ConfigError("vectors without a float32 copy need the re-rank rows of float16 or int8")
            self.dim = int(rerank.shape[1]) - (4 if self.dtype == "int8" else 0)
        else:
            self.dim = int(main.shape[1])
        self.float32 = main is not None  # False: the re-rank rows are all there is
        self.on_disk = _mapping(main if main is not None else cast(np.ndarray, rerank)) is not None
        # In memory (a fresh build): one growing array. On disk: the file, fixed, plus a fresh tier.
        self._mem = None if self.on_disk or main is None else Growable(main)
        self._file = np.asarray(main) if main is not None else np.empty((0, self.dim), np.float32)
        self.fresh = Growable(np.empty((0, self.dim), np.float32))
        # The float32 file gets the run reader (and MADV_RANDOM) only when re-ranking reads it; else it is
        # read by exact search alone, whole, with the kernel's read-ahead.
        self._main_rows = (
            MappedRows(main, path)
            if main is not None and self.on_disk and path is not None and dtype == "float32"
            else None
        )
        self._rerank = None if rerank is None else np.asarray(rerank)
        self._rerank_rows = (
            MappedRows(rerank, rerank_path)
            if rerank is not None and rerank_path is not None and _mapping(rerank) is not None
            else None
        )

    @property
    def main(self) -> np.ndarray:
        """The float32 rows of slots [0, n_main) (refused without a float32 copy: use rows())."""
        if not self.float32:
            raise ConfigError("this index keeps no float32 copy of its vectors (keep_float32=false): use rows()")
        return self._file if self._mem is None else self._mem.data

    @property
    def n_main(self) -> int:
        return len(self.main) if self.float32 else len(cast(np.ndarray, self._rerank))

    def decoded(self, start: int, stop: int) -> np.ndarray:
        """float32 rows of main slots [start, stop): the float32 copy's, else the re-rank rows decoded
        (int8: times their scale)."""
        if self.float32:
            return np.asarray(self.main[start:stop], np.float32)
        return _decoded_rows(cast(np.ndarray, self._rerank)[start:stop], self.dtype)

    @property
    def n(self) -> int:
        return self.n_main + self.fresh.n

    @property
    def reads_file(self) -> MappedRows | None:
        """The mapped file a re-rank reads, or None (re-ranking from memory)."""
        if self.dtype != "float32":
            return self._rerank_rows
        return self._main_rows

    def extend(self, rows: np.ndarray) -> None:
        (self.fresh if self._mem is None else self._mem).extend(rows)

    def set_dtype(self, dtype: str) -> None:
        """Re-rank from rows rounded to `dtype` from now on (rounded from the float32 vectors on the fly;
        a save writes them). Refused while a loaded re-rank file of another dtype is what re-ranking reads."""
        check_dtype(dtype)
        if self._rerank is not None and dtype != self.dtype:
            raise ConfigError(f"the re-rank rows are the snapshot's {self.dtype} file; rebuild for {dtype}")
        self.dtype = dtype

    def resident_bytes(self) -> int:
        """Bytes the process itself must hold: the in-memory tiers and the page maps (a mapped file
        is the kernel's cache)."""
        total = self.fresh.data.nbytes + (0 if self.on_disk or not self.float32 else self.main.nbytes)
        if self._rerank is not None and self._rerank_rows is None:
            total += self._rerank.nbytes  # the re-rank rows read into RAM
        return int(total + sum(f.seen_bytes for f in (self._main_rows, self._rerank_rows) if f is not None))

    def disk_bytes(self) -> int:
        """Bytes of the mapped files (float32 vectors and re-rank rows)."""
        rerank = self._rerank.nbytes if self._rerank is not None and self._rerank_rows is not None else 0
        return int((self.main.nbytes if self.on_disk and self.float32 else 0) + rerank)

    def scores(self, q: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Re-rank scores [m, c] of each query row with the vectors of its slots [m, c]; -1 slots score
        -inf. Each score is one faiss inner product of two rows, whatever the tier, the batch or the
        file that holds the row: the same bits from a file as from memory."""
        slots = np.ascontiguousarray(slots, np.int64)
        out = np.full(slots.shape, -np.inf, np.float32)
        n_main = self.n_main
        for i in range(len(q)):
            row = slots[i]
            in_main = np.flatnonzero((row >= 0) & (row < n_main))
            in_fresh = np.flatnonzero(row >= n_main)
            if len(in_main):
                out[i, in_main] = self._score_main(q[i : i + 1], row[in_main])
            if len(in_fresh):
                rows = self.fresh.data[row[in_fresh] - n_main]
                out[i, in_fresh] = score_stored(q[i : i + 1], encode(rows, self.dtype), self.dtype)
        return out

    def _score_main(self, query: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Scores of one query against main slots: the file's runs prefetched, then the rows gathered."""
        # rows in file order: each run is read front to back. One query's slots are distinct, so the
        # default sort does (4000-row re-rank pool: stable 154 us, default 80; the stable argsort was 12.7%
        # of a profiled 10M-item K=1000 search)
        order = np.argsort(slots)
        ordered = slots[order]
        f = self.reads_file
        if f is not None:
            f.prefetch(ordered)
        if self.dtype == "float32":
            scores = _inner_products_by_idx(query, self.main, ordered[None, :])[0]
        else:  # a block of rows at a time (int8: its decoded float32 rows stay in cache), never a pool-sized copy
            scores = np.empty(len(ordered), np.float32)
            for at in range(0, len(ordered), DECODE_ROWS):
                part = ordered[at : at + DECODE_ROWS]
                stored = self._rerank[part] if self._rerank is not None else encode(self.main[part], self.dtype)
                scores[at : at + DECODE_ROWS] = score_stored(query, stored, self.dtype)
        out = np.empty(len(slots), np.float32)
        out[order] = scores
        return out

    def exact_topk(self, q: np.ndarray, k: int, bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k slots over both tiers, float32 (bits: the slots that may be returned, or None: all)."""
        ids: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        # Most slots qualify: score them all and exclude the rest, rather than gather the qualifying
        # vectors (at 1M items a 0.5 GB copy per call).
        score_all = bits is None or int(bits.sum()) * 4 > len(bits)
        if not self.float32:  # the main slots from the re-rank rows; the fresh tier below as usual
            main_ids, main_scores = self._exact_decoded(q, k, bits, score_all)
            ids.append(main_ids)
            scores.append(main_scores)
        # main, not _file: a fresh build's rows grow in memory past the array it started from
        for first, arr in ((0, self.main if self.float32 else None), (self.n_main, self.fresh.data)):
            if arr is None or not len(arr):
                continue
            if score_all:
                hidden = None if bits is None else ~bits[first : first + len(arr)]

                def every(b: np.ndarray, arr: np.ndarray = arr, hidden: np.ndarray | None = hidden) -> np.ndarray:
                    scores = inner_products(b, arr)
                    if hidden is not None:
                        scores[:, hidden] = -np.inf
                    return scores

                s, top = topk_blocked(q, k, every, len(arr))
            else:
                idx = np.flatnonzero(cast(np.ndarray, bits)[first : first + len(arr)])  # not score_all: bits given
                if not len(idx):
                    continue
                qualifying = arr[idx]
                score = functools.partial(inner_products, vecs=qualifying)
                s, top = topk_blocked(q, k, score, len(idx), labels=idx)
            ids.append(np.where(s >= 0, s + first, -1))
            scores.append(top)
        if not ids:
            return padded(len(q), k)
        return merge_topk(ids, scores, k)

    def _exact_decoded(
        self, q: np.ndarray, k: int, bits: np.ndarray | None, score_all: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """exact_topk over the main slots from the re-rank rows (no float32 copy). Rows are the outer loop:
        each block is decoded once and scored against every query, its top-k merged into the running
        one, so the file is read once per call whatever the number of queries (ground truth for 1000
        queries at 100M items: one pass over 25.6 GB, not one per query block)."""
        n = self.n_main
        if not score_all:
            idx = np.flatnonzero(cast(np.ndarray, bits)[:n])
            if not len(idx):
                return padded(len(q), k)
            qualifying = self.rows(idx)
            return topk_blocked(q, k, functools.partial(inner_products, vecs=qualifying), len(idx), labels=idx)
        best = padded(len(q), k)
        for at in range(0, n, EXACT_ROWS):
            stop = min(at + EXACT_ROWS, n)
            if self.dtype == "float16":
                part = _fp16_block_topk(
                    q, k, cast(np.ndarray, self._rerank)[at:stop], None if bits is None else bits[at:stop]
                )
                best = merge_topk([best[0], np.where(part[0] >= 0, part[0] + at, -1)], [best[1], part[1]], k)
                continue
            rows = self.decoded(at, stop)
            hidden = None if bits is None else ~bits[at:stop]

            def block(b: np.ndarray, rows: np.ndarray = rows, hidden: np.ndarray | None = hidden) -> np.ndarray:
                scores = inner_products(b, rows)
                if hidden is not None:
                    scores[:, hidden] = -np.inf
                return scores

            part = topk_blocked(q, k, block, stop - at, labels=np.arange(at, stop, dtype=np.int64))
            best = merge_topk([best[0], part[0]], [best[1], part[1]], k)
        return best

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """float32 vectors of `slots` (any tier), [len(slots), dim] (without a float32 copy: the
        re-rank rows decoded)."""
        slots = np.asarray(slots, np.int64)
        out = np.empty((len(slots), self.dim), np.float32)
        in_main = slots < self.n_main
        if self.float32:
            out[in_main] = self.main[slots[in_main]]
        else:
            out[in_main] = _decoded_rows(cast(np.ndarray, self._rerank)[slots[in_main]], self.dtype)
        out[~in_main] = self.fresh.data[slots[~in_main] - self.n_main]
        return out

    def save(self, directory: Path, order: np.ndarray | None, float32: bool = True) -> dict[str, str]:
        """Write vectors.npy (float32; not with float32=False) and, for a rounded dtype, rerank.npy, in
        `order` (every slot once; None: slot order); return {file name: sha256}. Written a block of rows
        at a time."""
        n = self.n
        order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, np.int64)
        out = {}
        if float32:
            if not self.float32:
                raise ConfigError("no float32 copy of the vectors to save (keep_float32=false)")
            f32 = np.dtype(np.float32)
            out["vectors.npy"] = write_rows(directory / "vectors.npy", n, f32, self.dim, order, self.rows)
        if self.dtype != "float32":
            kind, cols = row_format(self.dtype, self.dim)

            def stored(slots: np.ndarray) -> np.ndarray:
                if self._rerank is not None:  # the saved rows again (the same bits as rounding anew)
                    main = slots < self.n_main
                    rows = np.empty((len(slots), cols), kind)
                    rows[main] = self._rerank[slots[main]]
                    rows[~main] = encode(self.fresh.data[slots[~main] - self.n_main], self.dtype)
                    return rows
                return encode(self.rows(slots), self.dtype)

            out["rerank.npy"] = write_rows(directory / "rerank.npy", n, kind, cols, order, stored)
        return out

    def warm(self) -> bool:
        """Read the re-rank file into the page cache (benchmarks of the warm path); False when nothing is on disk."""
        f = self.reads_file
        if f is None:
            return False
        f.warm()
        return True

    def evict(self) -> bool:
        """Drop the mapped files from this process and from the page cache, so the next reads go to disk
        (benchmarks of the cold path). Changes no system setting. False when nothing is on disk."""
        done = False
        for f in (self._main_rows, self._rerank_rows):
            if f is not None:
                f.evict()
                done = True
        if self.on_disk and self._main_rows is None and self.path is not None:  # float32 file, not re-ranked from
            evict_mapping(self._file, self.path)
            done = True
        return done


def write_rows(
    path: Path,
    n: int,
    dtype: np.dtype,
    cols: int,
    order: np.ndarray,
    take: Callable[[np.ndarray], np.ndarray],
) -> str:
    """Write a [n, cols] .npy whose row i is take(order[i : i + 1]), a block at a time; return its sha256."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, cols))
    for at in range(0, n, WRITE_ROWS):
        out[at : at + WRITE_ROWS] = take(order[at : at + WRITE_ROWS])
    out.flush()
    del out
    return sha256_file(path)


def resident_fraction(path: Path) -> float:
    """Share of a file's pages in the page cache now (mincore over a fresh read-only mapping; Linux)."""
    return float(resident_pages(path).mean()) if os.path.getsize(path) else 0.0


def resident_pages(path: Path) -> np.ndarray:
    """Per page of a file: in the page cache now (mincore over a fresh read-only mapping; Linux)."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, bool)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, np.uint8)
        rc = _libc().mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view  # the mapping cannot close while an array points into it
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    return (np.frombuffer(memoryview(vec), np.uint8) & 1).astype(bool)

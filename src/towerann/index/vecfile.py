"""Full vectors kept for re-ranking: the built catalog in a file on disk, the items added since in memory.

A compressed index holds codes in RAM and needs a full vector only for the short list it re-ranks.
`RerankVectors` keeps the saved catalog as a memory-mapped .npy (the kernel's page cache decides what
stays resident, not the process) and rows added after the load in an in-memory buffer, so a live add
never copies the whole file into RAM.

Reads of a short list from the file go out in parallel: rows on pages this process has not read
since the last eviction are split over a pool of reader threads, each scoring its rows in faiss (the
GIL is released, so each thread's page faults are in flight at once) - on this machine's virtual disk
1,000 random rows take ~180 ms one fault at a time and ~25-40 ms from 16-32 threads. Rows on pages
already read are scored inline: a thread hand-off costs more than reading a cached page. The mapping
is advised MADV_RANDOM: a fault then reads its own page, not the 128 KB read-around a sequential
reader wants.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import faiss
import numpy as np

from towerann.artifacts import sha256_file
from towerann.index.base import Growable, inner_products, madvise_pages
from towerann.index.merge import merge_topk, padded, topk_blocked

READERS = 16  # reader threads for a short list read from the file: I/O in flight at once
ROWS_PER_READ = 32  # fewer rows than this per thread is not worth a thread hand-off
MADV_RANDOM, MADV_DONTNEED = 1, 4  # Linux
_pool: ThreadPoolExecutor | None = None


def _one_omp_thread() -> None:
    faiss.omp_set_num_threads(1)  # per thread: a reader's faiss call must not fork an OpenMP team


def _readers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # one pool per process, made on first use (a forked worker makes its own)
        _pool = ThreadPoolExecutor(READERS, thread_name_prefix="towerann-rerank-read", initializer=_one_omp_thread)
    return _pool


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


def _after_fork() -> None:
    global _pool
    _pool = None  # the parent's threads do not exist in the child


os.register_at_fork(after_in_child=_after_fork)


def _mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The mmap under a memory-mapped array (np.load(mmap_mode=...)), or None for an in-memory one."""
    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) else None


class RerankVectors:
    """Vectors by slot: slots [0, n_main) in `main` (a memory-mapped file, or an array of a fresh
    build), later slots in an in-memory tier."""

    def __init__(self, main: np.ndarray, path: Path | None = None):
        self.path = path  # the file `main` maps (None: in memory)
        self.dim = int(main.shape[1])
        self.on_disk = _mapping(main) is not None
        # In memory (a fresh build): one growing array. On disk: the file, fixed, plus a fresh tier.
        self._mem = None if self.on_disk else Growable(main)
        self._file = np.asarray(main)  # a plain ndarray view: its gathers skip np.memmap's wrapping
        self.fresh = Growable(np.empty((0, self.dim), np.float32))
        if self.on_disk:
            mapping = np.frombuffer(cast(mmap.mmap, _mapping(main)), np.uint8)
            madvise_pages(mapping, mmap.PAGESIZE, (MADV_RANDOM,))
            self._offset = self._file.ctypes.data - mapping.ctypes.data  # the .npy header, before row 0
            self._row_bytes = self.dim * 4
            # Pages of the file this process has read since the last evict(): their rows are read inline.
            self._seen = np.zeros(-(-len(mapping) // mmap.PAGESIZE), bool)
            del mapping

    @property
    def main(self) -> np.ndarray:
        return self._file if self._mem is None else self._mem.data

    @property
    def n_main(self) -> int:
        return len(self.main)

    @property
    def n(self) -> int:
        return self.n_main + self.fresh.n

    def extend(self, rows: np.ndarray) -> None:
        (self.fresh if self._mem is None else self._mem).extend(rows)

    def resident_bytes(self) -> int:
        """Bytes the process itself must hold: the in-memory tiers (a mapped file is the kernel's cache)."""
        return self.fresh.data.nbytes + (self._seen.nbytes if self.on_disk else self.main.nbytes)

    def disk_bytes(self) -> int:
        return self.main.nbytes if self.on_disk else 0

    def scores(self, q: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Inner products [m, c] of each query row with the vectors of its slots [m, c]; -1 slots score -inf.

        Each score is one faiss inner product of two rows, whatever the tier, the batch or the thread
        that reads it: the same bits from the file as from memory."""
        slots = np.ascontiguousarray(slots, np.int64)
        in_main = np.where(slots < self.n_main, slots, -1)
        out = _inner_products_by_idx(q, self.main, in_main) if not self.on_disk else np.empty(slots.shape, np.float32)
        if self.on_disk:
            for i in range(len(q)):
                self._read_from_file(q[i : i + 1], in_main[i], out[i])
        if self.fresh.n and (slots >= self.n_main).any():
            fresh = _inner_products_by_idx(q, self.fresh.data, np.where(slots >= self.n_main, slots - self.n_main, -1))
            out = np.where(slots >= self.n_main, fresh, out)
        return out

    def _read_from_file(self, query: np.ndarray, slots: np.ndarray, out: np.ndarray) -> None:
        """Score one query's rows of the file: rows on pages this process has not read since the last
        eviction go to the reader threads (disk reads in flight together), the others are read here
        (their pages are in memory: a thread hand-off would cost more than the read)."""
        ok = slots >= 0
        first = (self._offset + np.where(ok, slots, 0) * self._row_bytes) // mmap.PAGESIZE
        last = (self._offset + (np.where(ok, slots, 0) + 1) * self._row_bytes - 1) // mmap.PAGESIZE
        unread = ok & ~(self._seen[first] & self._seen[last])
        cold = np.flatnonzero(unread)
        if len(cold) < 2 * ROWS_PER_READ:
            out[:] = _inner_products_by_idx(query, self.main, slots[None, :])[0]
        else:
            warm = np.flatnonzero(~unread)
            # Sorted slots: each reader takes a run of nearby rows (shared pages, shorter seeks).
            cold = cold[np.argsort(slots[cold], kind="stable")]
            parts = np.array_split(cold, min(READERS, len(cold) // ROWS_PER_READ))

            def read(part: np.ndarray) -> None:
                out[part] = _inner_products_by_idx(query, self.main, slots[part][None, :])[0]

            pending = [_readers().submit(read, part) for part in parts]
            if len(warm):
                read(warm)
            for f in pending:
                f.result()
        self._seen[first[ok]] = True  # benign races: concurrent searches only ever set flags
        self._seen[last[ok]] = True

    def exact_topk(self, q: np.ndarray, k: int, bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k slots over both tiers (bits: the slots that may be returned, or None: all)."""
        ids: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        # Most slots qualify: score them all and exclude the rest, rather than gather the qualifying
        # vectors (at 1M items a 0.5 GB copy per call).
        score_all = bits is None or int(bits.sum()) * 4 > len(bits)
        for first, arr in ((0, self.main), (self.n_main, self.fresh.data)):
            if not len(arr):
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

    def warm(self) -> bool:
        """Read the whole file once (a byte a page), so later re-ranks find every page cached and read
        inline: what a server that has run a while sees. False when nothing is on disk."""
        if not self.on_disk:
            return False
        view = np.frombuffer(cast(mmap.mmap, _mapping(self._file)), np.uint8)  # on disk: mapped
        step = 1 << 28  # 256 MB at a time
        for at in range(0, len(view), step):
            int(view[at : at + step : mmap.PAGESIZE].sum())
        del view
        self._seen[:] = True
        return True

    def evict(self) -> bool:
        """Drop the file's pages from this process and from the page cache, so the next reads go to disk
        (benchmarks of the cold path). Changes no system setting. False when nothing is on disk."""
        m = _mapping(self._file)
        if m is None or self.path is None:
            return False
        view = np.frombuffer(m, np.uint8)  # the mapping, page-aligned; its last page may be partial
        whole = -(-len(view) // mmap.PAGESIZE) * mmap.PAGESIZE
        ctypes.CDLL(None).madvise(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(whole), MADV_DONTNEED)
        del view
        self._seen[:] = False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # then the cache can let them go
        finally:
            os.close(fd)
        return True


def resident_fraction(path: Path) -> float:
    """Share of a file's pages in the page cache now (mincore over a fresh read-only mapping; Linux)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, np.uint8)
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view  # the mapping cannot close while an array points into it
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    return float((np.frombuffer(memoryview(vec), np.uint8) & 1).sum()) / pages


def save_rows(path: Path, parts: Sequence[np.ndarray], dim: int) -> str:
    """Write float32 row blocks as one .npy without concatenating them in memory; return its sha256."""
    n = sum(len(p) for p in parts)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    at = 0
    for p in parts:
        out[at : at + len(p)] = p
        at += len(p)
    out.flush()
    del out
    return sha256_file(path)

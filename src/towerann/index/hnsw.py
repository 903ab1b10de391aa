"""HNSW graph index on faiss IndexHNSWFlat, searched the way hnswlib searches.

Why faiss: less memory per item than hnswlib's graph, a mask runs inside the graph walk as a C++
bitmap selector (hnswlib filters through a Python callback per candidate), and the exact fallback
reads the stored vectors without a copy.

What this module adds to faiss' search:
- faiss' default *bounded* queue (MinimaxHeap) scans its ef-sized arrays on every pop
  (pop_min, count_below), so a search costs ~ef^2. Unmasked searches, and masks that keep at
  least POST_FILTER_SHARE of the slots (any removal or hidden item makes a mask), use an
  unbounded queue of binary heaps (hnswlib's algorithm) and drop masked-out slots from its beam;
  narrower masks keep the selector.
- build() stores the catalog cluster by cluster (k-means, ~1000 items each), so a walk's
  neighbours share pages and cache lines. It adds the catalog in one faiss call, which shuffles
  the insertion order (added in cluster-ordered chunks).
- Vectors and graph sit on transparent huge pages (THP "madvise" mode gives none unasked).
- partition_by (build param): a small HNSW per value of a category/attribute (index.value_partitions),
  the planner's "partition" path; live writes keep it in step (the insert / set_attributes / remove hooks).

How it compares with hnswlib, per ef and at a recall target, is measured by `towerann bench ann`
(hnswlib runs beside it in the same run); the committed runs are in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
from tqdm import tqdm

from towerann.errors import ArtifactError
from towerann.index.base import Mask, SlotIndex, available_memory_bytes, madvise_pages, release_pages
from towerann.index.merge import padded
from towerann.index.protocol import as_vectors
from towerann.index.value_partitions import DEFAULT_MIN_ITEMS, Partitions

log = logging.getLogger(__name__)


ADD_CHUNK = 50_000  # rows per add call of an incremental add, for progress reporting
# Masks that keep at least this share of the slots are applied after an unbounded beam search
# (see _walk); narrower ones go into the graph walk as a bitmap selector.
POST_FILTER_SHARE = 0.25  # below it the 4x cap on widening leaves the beam fewer than ef qualifying slots
# build() stores a catalog of at least this many items cluster by cluster (k-means, about
# ITEMS_PER_CLUSTER items each), so that graph neighbours mostly sit in nearby memory.
LOCALITY_MIN = 10_000
ITEMS_PER_CLUSTER = 1000
# ef as multiples of max(k, 16), cheapest first: the tuner's grid (search_space); `bench ann` sweeps the same up to 12.
# 1.25: recall climbs fastest at the low end (1M user-tower items, k=100: 0.943 at ef 100, 0.961 at 150), so a
# target of 0.95 fell between two steps 1.5x apart
# Up to 32x k: far-off queries need a deep beam (300k far-off items, M=32, k=100: recall 0.942 at ef 1600,
# 0.966 at 2400, 0.41x exact search's time), and the tuner reaches the steps past 16x only when the
# target was not reached below them (it stops once settings run at twice the best time).
HNSW_EF_STEPS = (1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # Linux


def locality_order(vectors: np.ndarray, seed: int = 1234) -> np.ndarray | None:
    """A permutation that puts each k-means cluster's vectors together (None: too few to matter).

    A graph walk reads ~ef neighbour lists and vectors scattered over the whole catalog; stored in
    cluster order, most of them share cache lines, pages and TLB entries with recently read ones.
    Measured 1.45x faster searches at ef=2000 on 200k items (module docstring)."""
    n, d = vectors.shape
    if n < LOCALITY_MIN:
        return None
    nc = min(n // ITEMS_PER_CLUSTER, 1024)  # at least 10 (LOCALITY_MIN); 1024: a few seconds of k-means even at 10M
    km = faiss.Kmeans(d, nc, niter=10, seed=seed, spherical=True, verbose=False)
    sample = vectors[:: max(1, n // (64 * nc))]  # evenly spaced: enough for coarse clusters, and deterministic
    km.train(np.ascontiguousarray(sample))
    labels = km.index.search(vectors, 1)[1][:, 0]
    return np.argsort(labels, kind="stable")


def huge_pages(buf: np.ndarray, collapse: bool) -> int:
    """Ask Linux for transparent huge pages over the 2 MB-aligned part of `buf`; return its bytes.

    Random reads over a graph of hundreds of MB miss the TLB on nearly every 4 KB page; with THP
    in "madvise" mode (the common default) nothing is huge unless asked. `collapse` converts the
    pages now (MADV_COLLAPSE, Linux 6.1+, ~2 ms per MB, GIL released); otherwise khugepaged does
    it in the background. Best effort: an unsupported kernel changes nothing."""
    return madvise_pages(buf, HUGE_PAGE, (MADV_HUGEPAGE, MADV_COLLAPSE) if collapse else (MADV_HUGEPAGE,))


class HNSWIndex(SlotIndex):
    kind = "hnsw"
    # partition_ef_scale: a partition's beam is ef times this (its graph is smaller than the whole one);
    # partition_walk_cost: rows a scan does in the time a walk spends per unit of beam (0: the default
    # estimate, index.value_partitions.WALK_ROWS_PER_EF); both measured by filter_plan.calibrate
    default_search: ClassVar[dict[str, Any]] = {"ef": 256, "partition_ef_scale": 1.0, "partition_walk_cost": 0}
    filter_paths: tuple[str, ...] = ("exact", "filtered", "post")

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        M: int = 32,
        ef_construction: int = 128,
        partition_by: str | None = None,
        partition_min: int = DEFAULT_MIN_ITEMS,
    ):
        """partition_by: keep a sub-index per value of this attribute ("category" or a filter
        attribute) with at least partition_min items (index.value_partitions: the planner's "partition" path)."""
        extra = {} if partition_by is None else {"partition_by": partition_by, "partition_min": int(partition_min)}
        super().__init__(dim, metric, M=int(M), ef_construction=int(ef_construction), **extra)
        self._ix = self._new_index()
        self._unmasked_params: dict[int, Any] = {}  # _walk's faiss search parameters, per ef
        self._partitions: Partitions | None = None
        if partition_by is not None:
            self._partitions = Partitions(
                self, partition_by, int(partition_min), {"M": int(M), "ef_construction": int(ef_construction)}
            )
            self.filter_paths = (*type(self).filter_paths, "partition")

    def _new_index(self) -> faiss.IndexHNSWFlat:
        ix = faiss.IndexHNSWFlat(self.dim, self.build_params["M"], faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction = self.build_params["ef_construction"]
        return ix

    def describe(self) -> str:
        parts = "" if self._partitions is None else f",partitions={self._partitions.by}>={self._partitions.min_items}"
        return f"HNSW{self.build_params['M']},Flat{parts}"

    def search_space(self, k: int) -> list[dict[str, Any]]:
        base = max(k, 16)  # _search raises ef to at least k: smaller ef changes nothing
        # steps of at most 1.5x: the tuner takes the smallest ef reaching its target, and a coarser step
        # overshoots it (1M user-tower items, k=100: 0.9475 at 8k, so 12k was chosen)
        return [{"ef": int(base * f)} for f in HNSW_EF_STEPS]

    def build(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Index a whole catalog, stored in locality order (slots are internal: ids map to them)."""
        v = as_vectors(vectors, self.dim, "vectors")
        order = None if self.n_slots else locality_order(v)
        if order is None:
            return super().build(v, ids, categories, available, attributes)

        def permuted(a: Any) -> Any:  # anything of the wrong shape goes through as is, for the base class to refuse
            return a if a is None or np.shape(a) != (len(v),) else np.asarray(a)[order]

        super().build(
            v[order],
            permuted(ids),
            permuted(categories),
            permuted(available),
            {name: permuted(codes) for name, codes in (attributes or {}).items()},
        )

    def buffers(self) -> list[np.ndarray]:
        """Views of the big C++ buffers (vectors, graph): what `release_memory` hands back."""
        storage = faiss.downcast_index(self._ix.storage)
        vecs = [getattr(storage, "codes", None), self._ix.hnsw.neighbors]  # type: ignore[attr-defined]
        return [faiss.rev_swig_ptr(v.data(), v.size()) for v in vecs if v is not None and v.size()]

    def release_memory(self) -> int:
        # Measured at 1M items: the faiss destructor holds the GIL ~55 ms while the kernel unmaps
        # ~800 MB; released here first (GIL dropped), the destructor then frees almost nothing.
        subs = [] if self._partitions is None else self._partitions.subs
        return sum(release_pages(buf) for buf in self.buffers()) + sum(sub.release_memory() for sub in subs)

    # ---- partitions: kept in step with every change of the slot tables -------------------------
    @property
    def partitions(self) -> Partitions | None:
        """The per-value sub-indexes (build param partition_by), or None without them."""
        return self._partitions

    def _insert(
        self,
        vectors: Any,
        ids: Any,
        categories: Any,
        available: Any,
        build: bool,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        if self._partitions is None:
            return super()._insert(vectors, ids, categories, available, build, attributes)
        replaced = self.slots_of(np.asarray(ids)) if np.ndim(ids) == 1 and len(self) else None
        first = self.n_slots
        super()._insert(vectors, ids, categories, available, build, attributes)
        if replaced is not None and len(replaced):
            self._partitions.forget(replaced)
        self._partitions.sync(np.arange(first, self.n_slots))

    def set_attributes(self, ids: Any, attributes: Mapping[str, Any]) -> None:
        super().set_attributes(ids, attributes)
        if self._partitions is not None and self._partitions.by in attributes:
            self._partitions.sync(self.aligned_slots(ids)[1])

    def remove(self, ids: Any) -> None:
        slots = self.slots_of(ids) if self._partitions is not None else None
        super().remove(ids)
        if self._partitions is not None and slots is not None and len(slots):
            self._partitions.forget(slots)

    def partition_info(self) -> dict[str, Any] | None:
        """The partitions (attribute, minimum size, values, sizes) and the memory they add
        (index.value_partitions.Partitions.memory), or None without them."""
        if self._partitions is None:
            return None
        return {**self._partitions.describe(), "memory": self._partitions.memory()}

    def _add_vectors(self, vectors: np.ndarray, first_slot: int, build: bool) -> None:
        if self._ix.ntotal != first_slot:
            raise ArtifactError(f"hnsw index holds {self._ix.ntotal} vectors but {first_slot} slots; rebuild it")
        if build:  # one call: faiss shuffles the insertion order within a call, so a catalog stored in
            # cluster order (build()) builds as good a graph as a shuffled one; added chunk by chunk,
            # clusters would arrive one after another (measured: recall@1000 capped at 0.999)
            log.info("hnsw: building the graph over %d vectors", len(vectors))
            self._ix.add(vectors)
        else:
            chunks = range(0, len(vectors), ADD_CHUNK)
            for s in tqdm(chunks, desc="hnsw add", unit="chunk", disable=None if len(chunks) > 1 else True):
                self._ix.add(vectors[s : s + ADD_CHUNK])
        self._huge_pages(collapse=build)  # a live write must not wait for the collapse

    def _room_to_grow(self) -> None:
        """Give the loaded graph's buffers room for as many items again, now, before it serves: read from
        a file they are exactly full, so the first live add reallocated and copied them all (vectors and
        links) on the event loop: 0.3-1.3 s at 1M items. One element more makes the C++ vector double
        its capacity (libstdc++); the room is address space until an add writes there, but the copy
        holds the graph twice for a moment, beside the bundle still served during a swap: skipped (and
        said) when that is more than a quarter of the memory available."""
        storage = faiss.downcast_index(self._ix.storage)
        hnsw = self._ix.hnsw
        vecs = [getattr(storage, "codes", None), hnsw.neighbors, hnsw.levels, hnsw.offsets]  # type: ignore[attr-defined]
        graph_bytes = sum(buf.nbytes for buf in self.buffers())
        available = available_memory_bytes()
        if available is not None and graph_bytes > available / 4:
            log.info(
                "hnsw: no room reserved for live adds (%.1f GB graph, %.1f GB available): the first add after "
                "this load copies the graph",
                graph_bytes / 1e9,
                available / 1e9,
            )
            return
        for vec in vecs:
            if vec is not None and vec.size():
                size = vec.size()
                vec.resize(size + 1)
                vec.resize(size)

    def _huge_pages(self, collapse: bool) -> int:
        return sum(huge_pages(buf, collapse) for buf in self.buffers())

    def _vectors(self) -> np.ndarray:
        n = self._ix.ntotal
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        storage = faiss.downcast_index(self._ix.storage)
        xb = storage.get_xb()  # type: ignore[attr-defined]  # IndexFlat's, once downcast
        vectors: np.ndarray = faiss.rev_swig_ptr(xb, n * self.dim).reshape(n, self.dim)  # no copy
        return vectors

    def _search(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        ef = max(int(params["ef"]), k)  # a beam narrower than k cannot return k results
        if mask is None:
            return self._walk(q, k, ef, None)
        # widen the beam as the mask narrows, up to 4x: wider costs more than brute force over
        # the qualifying items, which the base class uses for narrower masks
        ef = min(math.ceil(ef * len(mask.bits) / max(mask.count, 1)), 4 * ef)
        path = params.get("filter_path", "auto")  # the planner's choice (index.path_choice); auto: by share
        if self._partitions is not None and path in ("partition", "auto"):
            route = self._partitions.route(mask, k, params)
            if route.aligned:
                return self._partitions.search(q, k, params, mask)
            if path == "partition":  # a filter on another attribute: it would walk every partition
                log.debug("hnsw: mask not aligned with the %s partitions; brute force", self._partitions.by)
                return self.exact_search_slots(q, k, mask)
        if path == "partition":  # a filter_plan row naming partitions this index lacks (a forced
            path = "auto"  # filter_path is refused in _merge_params): its own choice
        if path == "filtered" or (path == "auto" and mask.count < POST_FILTER_SHARE * len(mask.bits)):
            return self._walk(q, k, ef, mask)
        # Most slots qualify: the unbounded beam (no selector) returns its whole beam, and the
        # masked-out slots are dropped here. Rows left short of k redo the selector search.
        slots, scores = self._walk(q, ef, ef, None)
        ok = (slots >= 0) & mask.bits[np.maximum(slots, 0)]
        rank = np.cumsum(ok, axis=1)
        take = ok & (rank <= k)
        rows, cols = np.nonzero(take)
        out_slots, out_scores = padded(len(q), k)
        pos = rank[rows, cols] - 1
        out_slots[rows, pos] = slots[rows, cols]
        out_scores[rows, pos] = scores[rows, cols]
        short = out_slots[:, k - 1] < 0
        if short.any():
            out_slots[short], out_scores[short] = self._walk(q[short], k, ef, mask)
        return out_slots, out_scores

    def _walk(self, q: np.ndarray, k: int, ef: int, mask: Mask | None) -> tuple[np.ndarray, np.ndarray]:
        """One faiss search: without a mask on the unbounded queue, with one as a bitmap selector.

        faiss' default bounded queue (MinimaxHeap) scans its whole ef-sized array on every pop,
        so its cost grows as ef^2 (2.1x the unbounded queue's at ef=4000, module docstring); the
        unbounded queue (binary heaps, hnswlib's algorithm) ignores a selector, so a mask needs
        the bounded one."""
        q = np.ascontiguousarray(q, dtype=np.float32)  # search_c reads n x dim floats from its pointer
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"hnsw walk: queries of shape {q.shape}, index dim {self.dim}")
        n = len(q)
        scores = np.empty((n, k), np.float32)
        slots = np.empty((n, k), np.int64)
        if mask is None:
            p = self._unmasked_params.get(ef)
            if p is None:  # made once per ef: making one took 4-8 us a search (one at ef 150 over 1M: ~150 us)
                p = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
                p.efSearch, p.bounded_queue = ef, False
                self._unmasked_params = {**self._unmasked_params, ef: p}  # replaced whole: other threads read it
        else:
            p = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            p.efSearch = ef
            bits = mask.packed  # kept referenced until the search returns
            p.sel = faiss.IDSelectorBitmap(len(mask.bits), faiss.swig_ptr(bits))
        # search_c: faiss' Python wrapper around it only checks and allocates what is done here
        self._ix.search_c(n, faiss.swig_ptr(q), k, faiss.swig_ptr(scores), faiss.swig_ptr(slots), p)  # type: ignore[attr-defined]
        return slots, scores

    def _save_backend(self, directory: Path) -> dict[str, Any]:
        faiss.write_index(self._ix, str(directory / "hnsw.faiss"))
        state: dict[str, Any] = {"file": "hnsw.faiss"}
        if self._partitions is not None:
            state["partitions"] = self._partitions.save(directory)
        return state

    def _load_backend(self, directory: Path, state: dict[str, Any]) -> None:
        path = directory / state["file"]
        try:
            ix = faiss.read_index(str(path))
        except RuntimeError as e:
            raise ArtifactError(f"{path}: not a readable faiss index ({e})") from e
        if not isinstance(ix, faiss.IndexHNSWFlat) or ix.ntotal != self.n_slots or ix.d != self.dim:
            raise ArtifactError(
                f"{path}: holds {type(ix).__name__} with {ix.ntotal} vectors of dim "
                f"{ix.d}; the manifest says HNSW with {self.n_slots} x {self.dim}"
            )
        self._ix = ix
        self._room_to_grow()
        self._huge_pages(collapse=True)
        if self._partitions is not None:
            self._partitions.load(directory, state.get("partitions"))

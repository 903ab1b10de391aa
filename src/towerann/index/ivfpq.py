"""IVF + PQ on faiss ("IVF{nlist},PQ{m}x8"): compressed codes in RAM, re-ranking from full vectors on disk.

Layout of a snapshot (backend_state "layout": 2): the slots are stored in inverted-list order, so
the entries of list l are the slots [starts[l], starts[l+1]) and faiss never needs an id per entry:

- ivfpq.faiss: the trained quantizer and PQ, no entries;
- ivfpq_lists.bin: every entry's PQ code in list (= slot) order, then, page-aligned, the slot ids of
  each list; a load maps it as faiss OnDiskInvertedLists. An unfiltered search runs with
  store_pairs (faiss returns (list, offset), slot = starts[list] + offset) and reads codes only; a
  masked search hands faiss a bitmap selector, which reads the ids of the lists it probes (from the
  page cache: file pages, not the process's memory);
- ivfpq_list_starts.npy: starts, int64 [nlist + 1];
- vectors.npy (float32, slot order) and, with rerank_dtype float16 or int8, rerank.npy: see
  towerann.index.vecfile. The rows of one list are neighbours on disk, so a query's re-rank reads
  are about one run per probed list.

What a loaded index holds in RAM per item is the PQ code (file-backed, read ahead at load: the
pages every search scans), the category code, two flag bits and any attribute codes, plus the
centroids; the slot -> id table and the id -> slot lookup stay memory-mapped (towerann.index.base).
Items added after a load go to an in-memory tier: a faiss index sharing the quantizer and PQ whose
entries carry their slot as id, searched beside the mapped lists, and their vectors in RAM.
A fresh build (not yet saved) is that in-memory tier alone, in insertion order; a save lays every
slot out in list order. `rerank_from="memory"` reads the re-rank rows into RAM at load. For tiny
catalogs, where k-means and PQ cannot be trained, the index stays untrained and answers by brute
force over the full vectors. A snapshot of the layout before (faiss' own lists with an id per
entry, slots in insertion order) still loads, into the in-memory tier.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from pathlib import Path
from typing import Any, ClassVar, cast

import faiss
import numpy as np

from towerann.artifacts import load_npy, save_npy, sha256_file
from towerann.errors import ArtifactError, ConfigError
from towerann.index.base import Mask, SlotIndex, madvise_pages
from towerann.index.merge import merge_topk, topk_rows
from towerann.index.vecfile import (
    MADV_RANDOM,
    MADV_WILLNEED,
    RerankVectors,
    check_dtype,
    row_format,
)

log = logging.getLogger(__name__)

RERANK_FROM = ("disk", "memory")
MIN_TRAIN = 2560  # below this many vectors: no IVF-PQ (PQ x8 wants 256 centroids per sub-space)
TRAIN_PER_LIST = 64  # training sample: this many points per inverted list (at least 256 per PQ centroid set)
LAYOUT = 2  # backend_state["layout"]: slots in list order, ivfpq_lists.bin; absent: faiss' lists with ids
LISTS, STARTS = "ivfpq_lists.bin", "ivfpq_list_starts.npy"
PAGE = mmap.PAGESIZE
PAIR_OFFSET = (1 << 32) - 1  # faiss' store_pairs label: list << 32 | offset
IDS_ALIGN = 1 << 21  # the ids region starts on a 2 MB boundary: no page, folio or read-ahead shared with codes
COARSE = ("auto", "flat", "hnsw")
# From this many lists, "auto" finds a vector's lists with an HNSW graph over the centroids instead of scoring
# every centroid: at 100M items (40k lists) a flat assignment is 40k x 128 multiply-adds per vector, hours
# for a build; the graph visits a few hundred centroids.
HNSW_COARSE_LISTS = 16384
HNSW_COARSE_M = 32


def _flag(value: Any, name: str) -> bool:
    """A boolean build param (a CLI --param gives the text "true"/"false")."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name}={value!r}: expected true or false")


def default_nlist(n: int) -> int:
    """~4 sqrt(n), clamped so every list gets >= 39 training points (faiss' own rule of thumb)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """Bytes per code: dim/8 sub-quantizers (128-d -> 16 bytes), a divisor of dim."""
    want = max(1, dim // 8)
    return max(m for m in range(1, want + 1) if dim % m == 0)


def lists_layout(sizes: np.ndarray, code_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Where ivfpq_lists.bin keeps each list: (code offsets, id offsets, file size).

    Codes of all lists first, in list order (list l at starts[l] * code_size); then, from the next
    2 MB boundary (codes and ids never share a page), each list's int64 ids, starting at a multiple of
    lcm(8, code_size): faiss' OnDiskInvertedLists finds a list's ids at its code offset + capacity x
    code_size, so that distance must be a whole number of codes."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    codes_at = starts[:-1] * code_size
    align = math.lcm(8, code_size)
    ids_at = np.empty(len(sizes), np.int64)
    at = -(-int(starts[-1]) * code_size // IDS_ALIGN) * IDS_ALIGN
    for list_no, size in enumerate(sizes.tolist()):
        at = -(-at // align) * align
        ids_at[list_no] = at
        at += 8 * size
    return codes_at, ids_at, max(PAGE, -(-at // PAGE) * PAGE)


def skeleton(trained: faiss.IndexIVFPQ) -> faiss.IndexIVFPQ:
    """An empty IVF-PQ index with `trained`'s quantizer (shared: keep `trained` alive) and PQ (copied)."""
    return _skeleton_of(trained, trained.quantizer)


def _skeleton_of(trained: faiss.IndexIVFPQ, quantizer: faiss.Index) -> faiss.IndexIVFPQ:
    ix = faiss.IndexIVFPQ(
        quantizer, trained.d, trained.nlist, trained.pq.M, trained.pq.nbits, faiss.METRIC_INNER_PRODUCT
    )
    ix.pq = trained.pq
    ix.by_residual = trained.by_residual
    ix.is_trained = True
    return ix


def _with_quantizer(trained: faiss.IndexIVFPQ, quantizer: faiss.Index) -> faiss.IndexIVFPQ:
    """`trained` (empty) with another quantizer over the same centroids; the PQ is copied."""
    ix = _skeleton_of(trained, quantizer)
    ix.quantizer_trains_alone = 0  # type: ignore[assignment]
    return ix


def _hnsw_coarse(trained: faiss.IndexIVFPQ) -> bool:
    return isinstance(faiss.downcast_index(trained.quantizer), faiss.IndexHNSW)


def coarse_search(trained: faiss.IndexIVFPQ, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, lists) of each query's `nprobe` nearest centroids; an HNSW quantizer searches with an
    ef of at least 2 x nprobe, so its lists are the flat scan's in all but rare cases."""
    quantizer = faiss.downcast_index(trained.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # in faiss, not in its stubs
        params.efSearch = max(2 * nprobe, 64)
        found: tuple[np.ndarray, np.ndarray] = quantizer.search(q, nprobe, params=params)
        return found
    found = quantizer.search(q, nprobe)
    return found


def _preassigned(
    ix: faiss.IndexIVFPQ,
    q: np.ndarray,
    k: int,
    lists: np.ndarray,
    coarse: np.ndarray,
    p: faiss.SearchParametersIVF,
    store_pairs: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """faiss' search over the given probed lists: (labels int64 [m, k], scores f32 [m, k])."""
    scores = np.empty((len(q), k), np.float32)
    labels = np.empty((len(q), k), np.int64)
    ix.search_preassigned_c(  # type: ignore[attr-defined]
        len(q),
        faiss.swig_ptr(q),
        k,
        faiss.swig_ptr(lists),
        faiss.swig_ptr(coarse),
        faiss.swig_ptr(scores),
        faiss.swig_ptr(labels),
        store_pairs,
        p,
    )
    return labels, scores


class IVFPQIndex(SlotIndex):
    kind = "ivfpq"
    default_search: ClassVar[dict[str, Any]] = {"nprobe": 32, "rerank": 1000}

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        nlist: int | None = None,
        pq_m: int | None = None,
        nbits: int = 8,
        train_sample: int = 200_000,
        seed: int = 1234,
        rerank_from: str = "disk",
        rerank_dtype: str = "float32",
        keep_float32: bool = True,
        coarse: str = "auto",
    ):
        pq_m = default_pq_m(dim) if pq_m is None else int(pq_m)
        if dim % pq_m:
            raise ConfigError(f"pq_m={pq_m} must divide dim={dim}")
        keep_float32 = _flag(keep_float32, "keep_float32")
        if coarse not in COARSE:
            raise ConfigError(f"coarse={coarse!r}: expected one of {', '.join(COARSE)}")
        if not keep_float32 and rerank_dtype == "float32":
            raise ConfigError(
                "keep_float32=false needs rerank_dtype float16 or int8: those rows are then the only copy of the "
                "vectors (re-ranking and exact search read them)"
            )
        if rerank_from not in RERANK_FROM:
            raise ConfigError(f"rerank_from={rerank_from!r}: expected one of {', '.join(RERANK_FROM)}")
        super().__init__(
            dim,
            metric,
            nlist=None if nlist is None else int(nlist),
            pq_m=pq_m,
            nbits=int(nbits),
            train_sample=int(train_sample),
            seed=int(seed),
            rerank_from=rerank_from,
            rerank_dtype=check_dtype(rerank_dtype),
            keep_float32=keep_float32,
            coarse=coarse,
        )
        self._vecs = RerankVectors(np.empty((0, self.dim), np.float32), dtype=rerank_dtype)
        self._ix: faiss.IndexIVFPQ | None = None  # entries with their slot as id (a build; adds after a load)
        self._main: faiss.IndexIVFPQ | None = None  # a loaded snapshot's lists, mapped (store_pairs)
        self._starts = np.zeros(1, np.int64)  # slot range of each mapped list: [starts[l], starts[l+1])
        self._lists_map: np.ndarray | None = None  # the mapped ivfpq_lists.bin (a view while _main lives)
        self._saving: tuple[np.ndarray | None, np.ndarray | None] = (None, None)  # (slot order, list sizes)
        # (directory, re-rank dtype) of the snapshot whose lists are mapped: a save with nothing added since
        # links its data files instead of writing them again
        self._loaded_from: tuple[Path, str] | None = None

    @property
    def _trained(self) -> faiss.IndexIVFPQ | None:
        """The trained index (quantizer, PQ); None: untrained, a tiny catalog searched by brute force."""
        return self._main if self._main is not None else self._ix

    @property
    def nlist(self) -> int | None:
        """Inverted lists of the trained index (None: untrained, a tiny catalog searched by brute force)."""
        t = self._trained
        return None if t is None else int(t.nlist)

    def nlist_for(self, n: int) -> int:
        """The number of lists a build over `n` vectors uses (the build param, clamped, or the default)."""
        nlist = self.build_params["nlist"]
        return default_nlist(n) if nlist is None else max(1, min(nlist, n // 39))

    def describe(self) -> str:
        t = self._trained
        if t is None:
            return "Flat(untrained IVF-PQ: too few items)"
        p = self.build_params
        refine = "Flat" if p["rerank_dtype"] == "float32" else p["rerank_dtype"]
        graph = f"_HNSW{HNSW_COARSE_M}" if _hnsw_coarse(t) else ""
        return f"IVF{t.nlist}{graph},PQ{p['pq_m']}x{p['nbits']}" + (
            f",Refine({refine})" if self.search_defaults.get("rerank") else ""
        )

    def search_space(self, k: int) -> list[dict[str, Any]]:
        """(nprobe, rerank) pairs ordered by estimated work: codes scanned x bytes + re-ranked x dim."""
        t = self._trained
        if t is None:
            return [{}]
        nlist, n = t.nlist, max(self.n_slots, 1)
        # Start where the probed lists hold about 2k codes: fewer cannot fill k rows from the library.
        first = min(nlist, max(1, math.ceil(2 * k * nlist / n)))
        probes = sorted({min(max(2**i, first), nlist) for i in range(0, 12)})
        # Re-rank pools up to 16k: far-off queries score their neighbours close together, and 16-byte
        # PQ codes cannot order them; the exact re-scoring of a deeper pool can.
        grid = [{"nprobe": p, "rerank": r} for p in probes for r in (0, 2 * k, 4 * k, 8 * k, 16 * k)]
        return sorted(grid, key=lambda g: g["nprobe"] * n / nlist * self.build_params["pq_m"] + g["rerank"] * self.dim)

    def _add_vectors(self, vectors: np.ndarray, first_slot: int, build: bool) -> None:
        if self._vecs.n == 0 and not self._vecs.on_disk:
            # A first build keeps the caller's array instead of a copy (10M x 128-d: 5 GB saved); it is
            # never written in place, since a later add outgrows it and copies.
            self._vecs = RerankVectors(vectors, dtype=self.build_params["rerank_dtype"])
        else:
            self._vecs.extend(vectors)
        if self._trained is None:  # first build, or a tiny catalog that may have grown past MIN_TRAIN
            everything = self._vectors()
            self._train(everything)
            if self._ix is not None:  # index everything stored so far
                self._ix.add_with_ids(everything, np.arange(self._vecs.n, dtype=np.int64))
            return
        if self._ix is None:  # the first add after a load: an in-memory tier beside the mapped lists
            self._ix = skeleton(cast(faiss.IndexIVFPQ, self._main))
        self._ix.add_with_ids(vectors, np.arange(first_slot, first_slot + len(vectors), dtype=np.int64))

    def _train(self, vectors: np.ndarray) -> None:
        n = len(vectors)
        if n < MIN_TRAIN:
            log.debug("ivfpq: %d items is too few to train IVF-PQ (< %d); searching by brute force", n, MIN_TRAIN)
            return
        rows = self.training_rows(n)
        self._ix = self.trained(vectors if rows is None else vectors[rows], n)

    def training_rows(self, n: int) -> np.ndarray | None:
        """The rows (sorted) a build over `n` vectors trains on; None: all of them."""
        p = self.build_params
        m = min(n, max(p["train_sample"], self.nlist_for(n) * TRAIN_PER_LIST, 256 * 39))
        return None if m >= n else np.sort(np.random.default_rng(p["seed"]).choice(n, m, replace=False))

    def trained(self, sample: np.ndarray, n: int) -> faiss.IndexIVFPQ:
        """An empty IVF-PQ index trained on `sample` (training_rows' rows of a build over `n` vectors)."""
        p = self.build_params
        nlist = self.nlist_for(n)
        quantizer = faiss.IndexFlatIP(self.dim)
        ix = faiss.IndexIVFPQ(quantizer, self.dim, nlist, p["pq_m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        ix.cp.seed = p["seed"]
        ix.pq.cp.seed = p["seed"]
        coarse = p.get("coarse", "auto")
        hnsw = coarse == "hnsw" or (coarse == "auto" and nlist >= HNSW_COARSE_LISTS)
        if hnsw:  # k-means assigns its sample through a graph over the centroids too (rebuilt each round)
            assign = faiss.IndexHNSWFlat(self.dim, HNSW_COARSE_M, faiss.METRIC_INNER_PRODUCT)
            ix.clustering_index = assign
        log.info("ivfpq: training IVF%d,PQ%dx%d on %d of %d vectors", nlist, p["pq_m"], p["nbits"], len(sample), n)
        ix.train(np.ascontiguousarray(sample, np.float32))
        ix.quantizer_trains_alone = 0  # type: ignore[assignment]  # a C++ char: the stub says str, SWIG takes 0
        if hnsw:
            graph = faiss.IndexHNSWFlat(self.dim, HNSW_COARSE_M, faiss.METRIC_INNER_PRODUCT)
            graph.add(quantizer.reconstruct_n(0, nlist))  # the trained centroids, as a graph
            ix = _with_quantizer(ix, graph)
        return ix

    def _vectors(self) -> np.ndarray:
        """All vectors as one array: a copy once items were added after a load (only a tiny catalog's
        training needs this; searches go through _exact and the re-ranker, which read the tiers)."""
        v = self._vecs
        if not v.float32:
            return v.rows(np.arange(v.n))
        return v.main if not v.fresh.n else np.concatenate([v.main, v.fresh.data])

    def vectors_of_slots(self, slots: np.ndarray) -> np.ndarray:
        """The stored vectors of `slots` (without a float32 copy: the re-rank rows decoded)."""
        return self._vecs.rows(np.asarray(slots, np.int64))

    def _exact(self, q: np.ndarray, k: int, mask: Mask | None) -> tuple[np.ndarray, np.ndarray]:
        return self._vecs.exact_topk(q, k, None if mask is None else mask.bits)

    @property
    def rerank_vectors(self) -> RerankVectors:
        """The full vectors re-ranking reads: the snapshot's files (mapped) or arrays in RAM, and the
        in-memory tier of items added since."""
        return self._vecs

    def set_rerank_dtype(self, dtype: str) -> None:
        """Re-rank from `dtype` rows from now on and write them on the next save (benchmarks compare
        dtypes on one build). Refused on a snapshot loaded with a re-rank file of another dtype."""
        self._vecs.set_dtype(dtype)
        self.build_params["rerank_dtype"] = dtype

    def warm_vectors(self) -> bool:
        """Read the re-rank file into the page cache (benchmarks of the warm path); False if in RAM."""
        return self._vecs.warm()

    def evict_vectors(self) -> bool:
        """Drop the vector files from the page cache (benchmarks of the cold path); False if in RAM."""
        return self._vecs.evict()

    def lists_ids_pages(self) -> tuple[int, int] | None:
        """(first, end) page of the ids region of the mapped ivfpq_lists.bin (None: nothing mapped): what
        an unfiltered search never reads."""
        if self._main is None:
            return None
        first = -(-int(self._starts[-1]) * int(self._main.code_size) // IDS_ALIGN) * IDS_ALIGN
        return first // PAGE, -(-len(cast(np.ndarray, self._lists_map)) // PAGE)

    def memory(self, as_loaded: bool = False) -> dict[str, Any]:
        """Bytes this index holds in the process (resident) and leaves on disk, in total and per slot.

        Resident: the PQ codes (a loaded snapshot's: file pages mapped from ivfpq_lists.bin, read
        ahead at load and scanned by every search, counted as `mapped_bytes`), the in-memory tier's
        codes and ids, coarse and PQ centroids, the slot tables the process holds (categories, flag
        bits, attribute codes, ids and lookup pairs of items added since the load), the page maps of
        the vector files, and vectors held in RAM (the fresh tier, or the re-rank rows with
        rerank_from="memory"). On disk (`disk_bytes`): the vector files (float32 and re-rank rows) as far
        as they stay mapped. Mapped tables (`mapped_tables_bytes_per_item`): the memory-mapped slot ->
        id table and id -> slot lookup and the ids region of the lists file, read only for the rows a
        search returns, for writes and (the lists' ids) by filtered searches. as_loaded: what a fresh
        load of this index's snapshot will hold (the manifest records that)."""
        n, d = self.n_slots, self.dim
        t = self._trained
        p = self.build_params
        code = 0 if t is None else int(t.code_size)
        centroids = 0 if t is None else t.nlist * (d * 4 + 24 + 8) + int(t.pq.centroids.size()) * 4
        if t is not None and _hnsw_coarse(t):  # the graph's links: 2M at level 0, a few more above
            centroids += t.nlist * (2 * HNSW_COARSE_M * 4 + 16)
        kind, cols = row_format(p["rerank_dtype"], d)
        rerank_row = 0 if p["rerank_dtype"] == "float32" else kind.itemsize * cols
        f32_row = 4 * d if p.get("keep_float32", True) else 0  # the float32 file's row
        page_map = (n * (rerank_row or 4 * d)) // PAGE + 1  # 1 byte a page of the file re-ranking reads
        if as_loaded:  # tables at their exact sizes; codes mapped; vectors in the files unless read into RAM
            layout = self.slot_table_layout()
            tables = sum(t["resident"] for t in layout.values())
            mapped = n * code
            in_ram = p.get("rerank_from") == "memory"
            reread = n * (rerank_row or 4 * d)  # the file re-ranking reads
            vectors = page_map + (reread if in_ram else 0)
            disk = n * f32_row + n * rerank_row - (reread if in_ram else 0)  # vector files, as mapped
            tables_mapped = (8 * n if t is not None else 0) + sum(t["mapped"] for t in layout.values())
            breakdown = {name: round(t["resident"] / max(n, 1), 3) for name, t in layout.items()}
        else:  # what is allocated now (growable tables have spare capacity)
            tables = self.slot_table_bytes(allocated=True)
            mapped = 0 if self._main is None else int(self._main.ntotal) * code
            vectors = self._vecs.resident_bytes()
            disk = self._vecs.disk_bytes()
            tables_mapped = self.slot_table_mapped_bytes() + (8 * int(self._main.ntotal) if self._main else 0)
            breakdown = {}
        tier = 0  # the in-memory tier's codes and ids (a fresh load has none)
        if self._ix is not None and not as_loaded:
            tier = int(self._ix.ntotal) * (code + 8) + (self._ix.nlist * 48 if self._main is not None else 0)
        resident = mapped + tier + centroids + tables + vectors
        per = max(n, 1)
        out: dict[str, Any] = {
            "resident_bytes": int(resident),
            "resident_bytes_per_item": round(resident / per, 1),
            "mapped_bytes": int(mapped),
            "anon_bytes": int(resident - mapped),
            "codes_bytes_per_item": code,
            "disk_bytes": int(disk),
            "disk_bytes_per_item": round(disk / per, 1),
            "mapped_tables_bytes_per_item": round(tables_mapped / per, 1),
            "rerank_dtype": p["rerank_dtype"],
        }
        if breakdown:
            per_item = {
                "pq_codes": code,
                "centroids": round(centroids / per, 3),
                **breakdown,
                "vector_page_map": round(vectors / per, 3),
            }
            out["resident_bytes_per_item_by_table"] = per_item
        return out

    def _search(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        trained = self._trained
        if trained is None:
            return self._exact(q, k, mask)
        rerank = int(params.get("rerank") or 0)
        fetch = max(k, rerank)
        p = faiss.SearchParametersIVF()
        nprobe = int(params["nprobe"])
        if mask is not None:  # probe more lists when few items qualify, to scan as many qualifying codes
            nprobe = math.ceil(nprobe * mask.n / max(mask.count, 1))
        p.nprobe = min(nprobe, trained.nlist)
        if mask is not None:
            bits = mask.packed  # kept referenced until the search returns
            p.sel = faiss.IDSelectorBitmap(mask.n, faiss.swig_ptr(bits))
        q = np.ascontiguousarray(q, np.float32)
        coarse, lists = coarse_search(trained, q, p.nprobe)  # once, for both tiers
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if self._main is not None and self._main.ntotal:
            # Unmasked: store_pairs, so faiss reads no ids; the slot is the list's start + the offset.
            labels, scores = _preassigned(self._main, q, fetch, lists, coarse, p, store_pairs=mask is None)
            if mask is None:
                pairs = np.maximum(labels, 0)
                labels = np.where(labels >= 0, self._starts[pairs >> 32] + (pairs & PAIR_OFFSET), -1)
            parts.append((labels, scores))
        if self._ix is not None and self._ix.ntotal:
            parts.append(_preassigned(self._ix, q, fetch, lists, coarse, p, store_pairs=False))
        if len(parts) == 1:
            slots, scores = parts[0]
        else:  # both tiers: their PQ scores are comparable (one quantizer, one PQ)
            slots, scores = merge_topk([s for s, _ in parts], [d for _, d in parts], fetch)
        if not rerank:
            return slots, scores
        exact = self._vecs.scores(q, slots)  # -1 slots score -inf
        cols, top = topk_rows(exact, k)
        out = np.take_along_axis(slots, np.maximum(cols, 0), axis=1)
        out[cols < 0] = -1
        return out, top

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: Path, order: np.ndarray | None = None) -> dict[str, Any]:
        """Write the snapshot with every slot in inverted-list order (the slot tables too)."""
        if order is not None:
            raise ConfigError("ivfpq lays its slots out itself (inverted-list order); save() takes no order")
        self._saving = self._list_order()
        try:
            return super().save(directory, order=self._saving[0])
        finally:
            self._saving = (None, None)

    def _list_order(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(the slots in list order: each list's mapped entries then its in-memory tier's; the list
        sizes), or (None, None) untrained (no lists: slot order)."""
        t = self._trained
        if t is None:
            return None, None
        nlist = t.nlist
        parts: list[np.ndarray] = []
        sizes = np.zeros(nlist, np.int64)
        tier = self._ix.invlists if self._ix is not None else None
        for list_no in range(nlist):
            mine = [np.arange(self._starts[list_no], self._starts[list_no + 1])] if self._main is not None else []
            if tier is not None and tier.list_size(list_no):
                ids = np.empty(tier.list_size(list_no), np.int64)
                faiss.memcpy(faiss.swig_ptr(ids), tier.get_ids(list_no), ids.nbytes)
                mine.append(ids)
            for m in mine:
                parts.append(m)
                sizes[list_no] += len(m)
        order = np.concatenate(parts) if parts else np.empty(0, np.int64)
        if len(order) != self.n_slots:
            raise ArtifactError(f"ivfpq: the lists hold {len(order)} entries for {self.n_slots} slots")
        return order, sizes

    def _save_backend(self, directory: Path) -> dict[str, Any]:
        order, sizes = self._saving
        linked = self._link_loaded_files(directory)
        keep = self.build_params["keep_float32"]
        if not linked:
            self._vecs.save(directory, order, float32=keep)
        state: dict[str, Any] = {
            "layout": LAYOUT,
            "vectors": "vectors.npy" if keep else None,
            "rerank": "rerank.npy" if self.build_params["rerank_dtype"] != "float32" else None,
            "file": None,
            "memory": self.memory(as_loaded=True),
        }
        t = self._trained
        if t is not None and sizes is not None:
            faiss.write_index(skeleton(t), str(directory / "ivfpq.faiss"))
            if not linked:
                self._write_lists(directory / LISTS, cast(np.ndarray, order), sizes)
                save_npy(directory / STARTS, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            state.update(file="ivfpq.faiss", lists=LISTS, list_starts=STARTS)
        return state

    def _link_loaded_files(self, directory: Path) -> bool:
        """With nothing added since the load (no in-memory tier, the same re-rank dtype), a save would write
        the loaded snapshot's vector and list files again byte for byte: hard-link them instead (artifacts
        are never written in place, so sharing is safe; at 100M items that is tens of GB not copied).
        False, having linked nothing, when anything changed or a file cannot be linked (another
        filesystem, the source version pruned)."""
        if self._loaded_from is None or self._ix is not None or self._vecs.fresh.n:
            return False
        source, dtype = self._loaded_from
        if dtype != self.build_params["rerank_dtype"]:
            return False
        names = [LISTS, STARTS] + (["vectors.npy"] if self.build_params["keep_float32"] else [])
        names += ["rerank.npy"] if dtype != "float32" else []
        try:
            for name in names:
                os.link(source / name, directory / name)
        except OSError as e:
            log.info("ivfpq save: %s; writing the files instead of linking them", e)
            for name in names:
                (directory / name).unlink(missing_ok=True)
            return False
        return True

    def _write_lists(self, path: Path, order: np.ndarray, sizes: np.ndarray) -> str:
        """ivfpq_lists.bin (lists_layout): each list's codes, its mapped entries' then its tier's, and
        its new slot ids (the list's range of the new slot order)."""
        t = cast(faiss.IndexIVFPQ, self._trained)
        cs = int(t.code_size)
        codes_at, ids_at, total = lists_layout(sizes, cs)
        out = np.memmap(path, dtype=np.uint8, mode="w+", shape=(total,))
        tier = self._ix.invlists if self._ix is not None else None
        new_start = 0
        for list_no in range(t.nlist):
            at = int(codes_at[list_no])
            if self._main is not None:
                lo, hi = int(self._starts[list_no]) * cs, int(self._starts[list_no + 1]) * cs
                out[at : at + hi - lo] = cast(np.ndarray, self._lists_map)[lo:hi]
                at += hi - lo
            if tier is not None and tier.list_size(list_no):
                nbytes = tier.list_size(list_no) * cs
                faiss.memcpy(faiss.swig_ptr(out[at : at + nbytes]), tier.get_codes(list_no), nbytes)
            size = int(sizes[list_no])
            slots = np.arange(new_start, new_start + size, dtype=np.int64)
            out[int(ids_at[list_no]) : int(ids_at[list_no]) + 8 * size] = slots.view(np.uint8)
            new_start += size
        out.flush()
        del out
        return sha256_file(path)

    def _load_backend(self, directory: Path, state: dict[str, Any]) -> None:
        p = self.build_params
        layout = int(state.get("layout", 1))
        if layout not in (1, LAYOUT):
            raise ArtifactError(
                f"{directory}: ivfpq snapshot layout {layout} is not one this version reads (1, {LAYOUT}); "
                "rebuild the index with `towerann index build`"
            )
        if (state.get("vectors") is not None) != p["keep_float32"]:
            raise ArtifactError(
                f"{directory}: keep_float32 is {p['keep_float32']} but the snapshot "
                f"{'has no' if p['keep_float32'] else 'has a'} float32 vectors file"
            )
        vecs = None
        if state.get("vectors") is not None:
            vecs = self.load_saved_vectors(directory, state["vectors"]).data  # memory-mapped, shape-checked
        rerank, rerank_path = None, None
        if p["rerank_dtype"] != "float32":
            if not state.get("rerank"):
                raise ArtifactError(
                    f"{directory}: rerank_dtype {p['rerank_dtype']} but the snapshot has no re-rank file; "
                    "rebuild the index with `towerann index build`"
                )
            rerank_path = directory / state["rerank"]
            rerank = load_npy(rerank_path, mmap=True)
            kind, cols = row_format(p["rerank_dtype"], self.dim)
            if rerank.shape != (self.n_slots, cols) or rerank.dtype != kind:
                raise ArtifactError(
                    f"{rerank_path}: {rerank.dtype}{list(rerank.shape)} does not match "
                    f"{kind}[{self.n_slots}, {cols}] for rerank_dtype {p['rerank_dtype']}"
                )
        if p.get("rerank_from") == "memory":  # read the rows re-ranking reads into RAM
            if rerank is None:
                vecs = np.array(vecs)
            else:
                rerank, rerank_path = np.array(rerank), None
        path = None if vecs is None else directory / state["vectors"]
        self._vecs = RerankVectors(vecs, path, p["rerank_dtype"], rerank, rerank_path)
        if not state.get("file"):
            return
        path = directory / state["file"]
        try:
            ix = cast(faiss.IndexIVFPQ, faiss.read_index(str(path)))
        except RuntimeError as e:
            raise ArtifactError(f"{path}: not a readable faiss index ({e})") from e
        if layout == 1:  # faiss' own lists, an id per entry, all in memory: the in-memory tier
            if ix.ntotal != self.n_slots or ix.d != self.dim:
                raise ArtifactError(
                    f"{path}: {ix.ntotal} vectors of dim {ix.d}; the manifest says {self.n_slots} x {self.dim}"
                )
            self._ix = ix
            return
        if ix.ntotal != 0 or ix.d != self.dim or not ix.is_trained:
            raise ArtifactError(f"{path}: expected an empty trained IVF-PQ of dim {self.dim}")
        self._map_lists(directory, state, ix)
        names = (state["vectors"], state["lists"], state["list_starts"], state.get("rerank"))
        float32_name = "vectors.npy" if p["keep_float32"] else None
        if names == (float32_name, LISTS, STARTS, "rerank.npy" if p["rerank_dtype"] != "float32" else None):
            self._loaded_from = (Path(directory), p["rerank_dtype"])

    def _map_lists(self, directory: Path, state: dict[str, Any], ix: faiss.IndexIVFPQ) -> None:
        """Map ivfpq_lists.bin as ix's inverted lists (OnDiskInvertedLists, read-only)."""
        starts = load_npy(directory / state["list_starts"])
        lists_path = directory / state["lists"]
        sizes = np.diff(starts) if starts.ndim == 1 else np.empty(0, np.int64)
        if (
            starts.shape != (ix.nlist + 1,)
            or starts.dtype != np.int64
            or starts[0] != 0
            or starts[-1] != self.n_slots
            or (sizes < 0).any()
        ):
            raise ArtifactError(
                f"{directory / state['list_starts']}: not the list starts of {ix.nlist} lists over {self.n_slots} slots"
            )
        cs = int(ix.code_size)
        codes_at, ids_at, total = lists_layout(sizes, cs)
        if lists_path.stat().st_size != total:
            raise ArtifactError(f"{lists_path}: {lists_path.stat().st_size} bytes, the layout needs {total}")
        il = faiss.OnDiskInvertedLists(ix.nlist, cs, str(lists_path))
        il.read_only = True
        # faiss' prefetch threads would read every probed list's codes *and ids* on each search: none.
        il.prefetch_nthread = 0
        il.totsize = int(total)
        meta = faiss.OnDiskOneListVector()  # type: ignore[attr-defined]
        for size, code_at, id_at in zip(sizes.tolist(), codes_at.tolist(), ids_at.tolist()):
            one = faiss.OnDiskOneList()
            one.size, one.capacity, one.offset = size, (id_at - code_at) // cs, code_at
            meta.push_back(one)
        il.lists = meta
        il.do_mmap()
        ix.replace_invlists(il, True)
        il.this.disown()  # type: ignore[attr-defined]  # the index owns (and unmaps) it now
        ix.ntotal = self.n_slots
        view = faiss.rev_swig_ptr(il.ptr, int(total))
        # No read-around (an id page is read only by a filtered search); the codes read ahead now.
        madvise_pages(view, PAGE, (MADV_RANDOM,))
        madvise_pages(view[: -(-self.n_slots * cs // PAGE) * PAGE], PAGE, (MADV_WILLNEED,))
        self._main, self._starts, self._lists_map = ix, starts, view

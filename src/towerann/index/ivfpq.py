"""IVF + PQ on faiss ("IVF{nlist},PQ{m}x8"): compressed codes in RAM, re-ranking from full vectors on disk.

What the process holds per item is the PQ code, faiss' list id and the slot tables; the full vectors
stay in the snapshot's vectors.npy (towerann.index.vecfile: memory-mapped, a short list read at a
time, in parallel) and are read only to re-rank the top `rerank` candidates and for exact fallbacks.
Items added after a load go to an in-memory tier. `rerank_from="memory"` reads the file into RAM at
load instead (the in-RAM variant, for machines with RAM to spare). For tiny catalogs, where k-means
and PQ cannot be trained, the index stays untrained and answers by brute force over the full vectors.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar, cast

import faiss
import numpy as np

from towerann.errors import ArtifactError, ConfigError
from towerann.index.base import Mask, SlotIndex
from towerann.index.merge import topk_rows
from towerann.index.vecfile import RerankVectors, save_rows

log = logging.getLogger(__name__)

RERANK_FROM = ("disk", "memory")
MIN_TRAIN = 2560  # below this many vectors: no IVF-PQ (PQ x8 wants 256 centroids per sub-space)
TRAIN_PER_LIST = 64  # training sample: this many points per inverted list (at least 256 per PQ centroid set)


def default_nlist(n: int) -> int:
    """~4 sqrt(n), clamped so every list gets >= 39 training points (faiss' own rule of thumb)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """Bytes per code: dim/8 sub-quantizers (128-d -> 16 bytes), a divisor of dim."""
    want = max(1, dim // 8)
    return max(m for m in range(1, want + 1) if dim % m == 0)


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
    ):
        pq_m = default_pq_m(dim) if pq_m is None else int(pq_m)
        if dim % pq_m:
            raise ConfigError(f"pq_m={pq_m} must divide dim={dim}")
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
        )
        self._vecs = RerankVectors(np.empty((0, self.dim), np.float32))
        self._ix: faiss.IndexIVFPQ | None = None  # None: untrained (tiny catalog), brute force

    @property
    def nlist(self) -> int | None:
        """Inverted lists of the trained index (None: untrained, a tiny catalog searched by brute force)."""
        return None if self._ix is None else int(self._ix.nlist)

    def nlist_for(self, n: int) -> int:
        """The number of lists a build over `n` vectors uses (the build param, clamped, or the default)."""
        nlist = self.build_params["nlist"]
        return default_nlist(n) if nlist is None else max(1, min(nlist, n // 39))

    def describe(self) -> str:
        if self._ix is None:
            return "Flat(untrained IVF-PQ: too few items)"
        p = self.build_params
        return f"IVF{self._ix.nlist},PQ{p['pq_m']}x{p['nbits']}" + (
            ",Refine(Flat)" if self.search_defaults.get("rerank") else ""
        )

    def search_space(self, k: int) -> list[dict[str, Any]]:
        """(nprobe, rerank) pairs ordered by estimated work: codes scanned x bytes + re-ranked x dim."""
        if self._ix is None:
            return [{}]
        nlist, n = self._ix.nlist, max(self.n_slots, 1)
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
            self._vecs = RerankVectors(vectors)
        else:
            self._vecs.extend(vectors)
        if self._ix is None:  # first build, or a tiny catalog that may have grown past MIN_TRAIN
            everything = self._vectors()
            self._train(everything)
            if self._ix is not None:  # index everything stored so far
                self._ix.add_with_ids(everything, np.arange(self._vecs.n, dtype=np.int64))
            return
        if self._ix is not None:
            self._ix.add_with_ids(vectors, np.arange(first_slot, first_slot + len(vectors), dtype=np.int64))

    def _train(self, vectors: np.ndarray) -> None:
        n = len(vectors)
        if n < MIN_TRAIN:
            log.debug("ivfpq: %d items is too few to train IVF-PQ (< %d); searching by brute force", n, MIN_TRAIN)
            return
        p = self.build_params
        nlist = self.nlist_for(n)
        quantizer = faiss.IndexFlatIP(self.dim)
        ix = faiss.IndexIVFPQ(quantizer, self.dim, nlist, p["pq_m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        ix.cp.seed = p["seed"]
        ix.pq.cp.seed = p["seed"]
        m = min(n, max(p["train_sample"], nlist * TRAIN_PER_LIST, 256 * 39))
        sample = vectors if m >= n else vectors[np.sort(np.random.default_rng(p["seed"]).choice(n, m, replace=False))]
        log.info("ivfpq: training IVF%d,PQ%dx%d on %d of %d vectors", nlist, p["pq_m"], p["nbits"], len(sample), n)
        ix.train(np.ascontiguousarray(sample))
        ix.quantizer_trains_alone = 0  # type: ignore[assignment]  # a C++ char: the stub says str, SWIG takes 0
        self._ix = ix

    def _vectors(self) -> np.ndarray:
        """All vectors as one array: a copy once items were added after a load (only a tiny catalog's
        training needs this; searches go through _exact and the re-ranker, which read the tiers)."""
        v = self._vecs
        return v.main if not v.fresh.n else np.concatenate([v.main, v.fresh.data])

    def _exact(self, q: np.ndarray, k: int, mask: Mask | None) -> tuple[np.ndarray, np.ndarray]:
        return self._vecs.exact_topk(q, k, None if mask is None else mask.bits)

    @property
    def rerank_vectors(self) -> RerankVectors:
        """The full vectors re-ranking reads: the snapshot's file (mapped) or an array in RAM, and the
        in-memory tier of items added since."""
        return self._vecs

    def warm_vectors(self) -> bool:
        """Read the on-disk vectors into the page cache (benchmarks of the warm path); False if in RAM."""
        return self._vecs.warm()

    def evict_vectors(self) -> bool:
        """Drop the on-disk vectors from the page cache (benchmarks of the cold path); False if in RAM."""
        return self._vecs.evict()

    def memory(self, as_loaded: bool = False) -> dict[str, float]:
        """Bytes this index holds in the process (resident) and leaves on disk, in total and per slot.

        Resident: faiss' codes and list ids, coarse and PQ centroids, the slot tables (ids, category,
        flags, filter attributes, the id lookup), and vectors held in
        RAM (the fresh tier, or all of them with rerank_from="memory"). The mapped vector file is not
        counted: its pages are the kernel's cache, dropped under memory pressure. as_loaded: what a
        fresh load of this index's snapshot will hold (the manifest records that)."""
        n = self.n_slots
        faiss_bytes = 0
        if self._ix is not None:
            ix = self._ix
            faiss_bytes = (
                ix.ntotal * (ix.code_size + 8)  # codes + int64 list ids
                + ix.nlist * (self.dim * 4 + 48)  # centroids + two std::vector headers a list
                + ix.pq.centroids.size() * 4
            )
        if as_loaded:  # tables at their exact sizes; vectors in the file unless read into RAM
            tables = n * (8 + 4 + 1 + 1 + 1 + 4 * len(self.attribute_names)) + len(self) * 16
            in_ram = self.build_params.get("rerank_from") == "memory"
            vectors, disk = (n * self.dim * 4, 0) if in_ram else (0, n * self.dim * 4)
        else:  # what is allocated now (growable tables have spare capacity)
            tables = self.slot_table_bytes(allocated=True)
            vectors, disk = self._vecs.resident_bytes(), self._vecs.disk_bytes()
        resident = faiss_bytes + tables + vectors
        per = max(n, 1)
        return {
            "resident_bytes": int(resident),
            "resident_bytes_per_item": round(resident / per, 1),
            "codes_bytes_per_item": int(self._ix.code_size) if self._ix is not None else 0,
            "disk_bytes": int(disk),
            "disk_bytes_per_item": round(disk / per, 1),
        }

    def _search(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._ix is None:
            return self._exact(q, k, mask)
        rerank = int(params.get("rerank") or 0)
        fetch = max(k, rerank)
        p = faiss.SearchParametersIVF()
        nprobe = int(params["nprobe"])
        if mask is not None:  # probe more lists when few items qualify, to scan as many qualifying codes
            nprobe = math.ceil(nprobe * len(mask.bits) / max(mask.count, 1))
        p.nprobe = min(nprobe, self._ix.nlist)
        if mask is not None:
            bits = mask.packed  # kept referenced until the search returns
            p.sel = faiss.IDSelectorBitmap(len(mask.bits), faiss.swig_ptr(bits))
        scores, slots = self._ix.search(q, fetch, params=p)
        if not rerank:
            return slots, scores
        exact = self._vecs.scores(q, slots)  # -1 slots score -inf
        cols, top = topk_rows(exact, k)
        out = np.take_along_axis(slots, np.maximum(cols, 0), axis=1)
        out[cols < 0] = -1
        return out, top

    def _save_backend(self, directory: Path) -> dict[str, Any]:
        save_rows(directory / "vectors.npy", [self._vecs.main, self._vecs.fresh.data], self.dim)
        state: dict[str, Any] = {"vectors": "vectors.npy", "file": None, "memory": self.memory(as_loaded=True)}
        if self._ix is not None:
            faiss.write_index(self._ix, str(directory / "ivfpq.faiss"))
            state["file"] = "ivfpq.faiss"
        return state

    def _load_backend(self, directory: Path, state: dict[str, Any]) -> None:
        vecs = self.load_saved_vectors(directory, state["vectors"]).data  # memory-mapped, shape-checked
        if self.build_params.get("rerank_from") == "memory":
            vecs = np.array(vecs)  # read into RAM
        self._vecs = RerankVectors(vecs, directory / state["vectors"])
        if state.get("file"):
            path = directory / state["file"]
            try:
                self._ix = ix = cast(faiss.IndexIVFPQ, faiss.read_index(str(path)))
            except RuntimeError as e:
                raise ArtifactError(f"{path}: not a readable faiss index ({e})") from e
            if ix.ntotal != self.n_slots or ix.d != self.dim:
                raise ArtifactError(
                    f"{path}: {ix.ntotal} vectors of dim {ix.d}; the manifest says {self.n_slots} x {self.dim}"
                )

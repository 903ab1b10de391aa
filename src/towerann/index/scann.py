"""ScaNN (tree + anisotropic quantization + exact re-rank), with a delta tier for what ScaNN cannot do cheaply.

ScaNN's own upsert/delete rebuild structures and its Python docid mapping is pickled, so this
backend never uses them: items added after the build go to a small exact *delta* tier searched
beside ScaNN and merged by score; removed/unavailable/filtered items are masked by over-fetching
from ScaNN and dropping them (the base class falls back to exact search when that comes up short).
The next build folds the delta in.

The exact re-rank of ScaNN's candidate pool (search param `reorder`: the pool size) reads the float
vectors this index keeps anyway (memory-mapped `vectors.npy`), not a float copy inside ScaNN: a ScaNN
that keeps one computes per-leaf statistics over it and reads it into memory when it loads, all while
holding the GIL (a hot swap at 1M x 64-d stalled every request ~0.8-1 s; without it ~0.3 s), and it
is a second copy of the vectors in memory. Snapshots written before carry ScaNN's own reorder
(backend_state without "rerank", or "rerank": "scann") and still search that way.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from towerann.artifacts import save_npy
from towerann.errors import ArtifactError, BackendUnavailable
from towerann.index.base import Growable, Mask, SlotIndex, inner_products, top_inner_products
from towerann.index.merge import merge_topk, topk_rows

log = logging.getLogger(__name__)

MIN_TREE = 2000  # below this many items ScaNN runs brute force (no partitioning to train)
MAX_OVERFETCH = 10  # fetch at most this many times k from ScaNN when items are masked
REFETCH_ROUNDS = 2  # the "filtered" path: rows left short fetch 4x more, this many times
# backend_state["rerank"]: who re-scores the tree's candidate pool exactly. "towerann": this module,
# over its own vectors (every build since); "scann": ScaNN's reorder over its own float dataset (the
# layout before, and the meaning of a state without the field).
RERANK_TOWERANN, RERANK_SCANN = "towerann", "scann"
RESCORE_CHUNK = 1024  # candidate rows gathered at a time for the exact re-rank (256 KB at 64-d)
# Whether a loaded searcher runs in a helper process (index/scann_process.py). A serving process turns it
# on (server.wiring.open_service): ScaNN's loader holds the GIL for its whole run, which stalled every
# request during a hot swap. Batch jobs, builds and the tests of this module search in process.
_load_in_helper_process = False


def load_in_helper_process(on: bool = True) -> None:
    """From now on, ScaNN searchers loaded from snapshots in this process run in helper processes."""
    global _load_in_helper_process
    _load_in_helper_process = on


def default_leaves(n: int, num_leaves: int | None = None) -> int:
    """Tree leaves of a build over `n` items: sqrt(n) unless given, at least 50 items a leaf."""
    return max(2, min(num_leaves or int(round(math.sqrt(n))), n // 50))


def scores_at(q: np.ndarray, vecs: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Exact scores [m, n]: q[i] . vecs[slots[i, j]], -inf where slots[i, j] < 0.

    One thread whatever OpenMP is set to: faiss' by-index kernel forks an OpenMP team even for one
    query, which on a busy host costs far more than the scoring (2 cores under load: p50 19 ms against
    0.25 ms single-threaded). So the rows are gathered a chunk at a time into a buffer that stays in
    cache (numpy's take) and scored there (faiss' plain kernel); both release the GIL, so a memory map
    faulting pages in does not stall other requests."""
    import faiss

    q = np.ascontiguousarray(q, np.float32)
    m, n = slots.shape
    d = vecs.shape[1]
    out = np.empty((m, n), np.float32)
    buf = np.empty((min(n, RESCORE_CHUNK), d), np.float32)
    for i in range(m):
        for a in range(0, n, RESCORE_CHUNK):
            b = min(a + RESCORE_CHUNK, n)
            np.take(vecs, slots[i, a:b], axis=0, out=buf[: b - a], mode="clip")  # unbuffered; -1 scored below
            faiss.fvec_inner_products_ny(  # type: ignore[attr-defined]
                faiss.swig_ptr(out[i, a:b]), faiss.swig_ptr(q[i]), faiss.swig_ptr(buf), d, b - a
            )
    out[slots < 0] = -np.inf
    return out


def _scann() -> Any:
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as e:
        raise BackendUnavailable(f"the scann backend needs ScaNN: pip install 'towerann[scann]' ({e})") from e
    return scann_ops_pybind


class ScannIndex(SlotIndex):
    kind = "scann"
    default_search: ClassVar[dict[str, Any]] = {"leaves": 0, "reorder": 0}  # 0: set from the catalog size at build
    # "filtered" searches more leaves as the mask narrows; "post" only over-fetches (both drop masked slots)
    filter_paths: tuple[str, ...] = ("exact", "filtered", "post")

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        num_leaves: int | None = None,
        reorder: int = 1000,
        train_sample: int = 100_000,
        quantization_threshold: float = 0.2,
    ):
        super().__init__(
            dim,
            metric,
            num_leaves=None if num_leaves is None else int(num_leaves),
            reorder=int(reorder),
            train_sample=int(train_sample),
            quantization_threshold=float(quantization_threshold),
        )
        _scann()  # fail at construction, not at the first build
        self._vecs = Growable(np.empty((0, self.dim), np.float32))
        self._searcher: Any = None
        self._n_main = 0  # slots [0, n_main) are in ScaNN; the rest form the delta tier
        self._leaves = 0  # 0: brute force
        self._rerank = RERANK_TOWERANN  # RERANK_SCANN: a snapshot from before (ScaNN holds a float copy)

    @property
    def leaves(self) -> int:
        """Tree leaves of the main tier (0: brute force, a catalog too small for a tree)."""
        return self._leaves

    def describe(self) -> str:
        main = f"ScaNN(tree{self._leaves},AH2,reorder)" if self._leaves else "ScaNN(brute)"
        return main + (f"+delta{self.n_slots - self._n_main}" if self.n_slots > self._n_main else "")

    def search_space(self, k: int) -> list[dict[str, Any]]:
        """(leaves, reorder) pairs ordered by estimated work: points scored x dim/2 + reordered x dim."""
        if not self._leaves:
            return [{}]
        n = max(self._n_main, 1)
        # Start where the searched leaves hold about 2k items: fewer cannot fill k rows from the library.
        first = min(self._leaves, max(1, math.ceil(2 * k * self._leaves / n)))
        # Steps of ~1.4x (2^i and 1.5 * 2^i): far-off queries need a fifth of the leaves or more, where
        # a doubling overshoots. Reorder up to 16k: their AH scores sit close together, so a deeper exact
        # re-scoring lifts recall (1M far-off items, k=100, 200 of 1000 leaves: 0.955 at 8k, 0.968 at 16k).
        steps = {x for i in range(0, 14) for x in (2**i, 3 * 2**i // 2)}
        leaves = sorted({min(max(x, first), self._leaves) for x in steps})
        grid = [{"leaves": lv, "reorder": r} for lv in leaves for r in (k, 2 * k, 4 * k, 8 * k, 16 * k)]
        return sorted(grid, key=lambda g: g["leaves"] * n / self._leaves * self.dim / 2 + g["reorder"] * self.dim)

    def _add_vectors(self, vectors: np.ndarray, first_slot: int, build: bool) -> None:
        self._vecs.extend(vectors)
        if build:
            self._build_main(self._vecs.data)

    def _build_main(self, vecs: np.ndarray) -> None:
        sp = _scann()
        n = len(vecs)
        p = self.build_params
        reorder = max(1, min(p["reorder"], n))
        builder = sp.builder(vecs, min(10, n), "dot_product")
        if n >= MIN_TREE and self.dim % 2 == 0:
            leaves = default_leaves(n, p["num_leaves"])
            search_leaves = max(1, leaves // 5)  # 20%: user-tower queries sit between clusters
            # k-means++ seeding: the default random seeding is drawn afresh each build, so two builds of
            # one catalog measured recall 0.949 and 0.956 at one setting and tuned apart; this one is
            # the same every build (1M items: 24 s instead of 17 s).
            builder = builder.tree(
                num_leaves=leaves,
                num_leaves_to_search=search_leaves,
                training_sample_size=min(n, p["train_sample"]),
                random_init=False,
            )
            builder = builder.score_ah(2, anisotropic_quantization_threshold=p["quantization_threshold"])
            if self._rerank == RERANK_SCANN:  # the layout before (kept to build one for the tests)
                builder = builder.reorder(reorder)
            self._leaves = leaves
        else:
            builder = builder.score_brute_force()
            self._leaves, search_leaves = 0, 0
        log.info("scann: building over %d items (%s)", n, f"{self._leaves} leaves" if self._leaves else "brute force")
        self._searcher = builder.build()
        self._n_main = n
        if not self.search_defaults.get("leaves"):
            self.search_defaults["leaves"] = search_leaves
        if not self.search_defaults.get("reorder"):
            self.search_defaults["reorder"] = reorder

    def _vectors(self) -> np.ndarray:
        return self._vecs.data

    def buffers(self) -> list[np.ndarray]:
        """The big buffer this index holds: its vectors (mapped from the snapshot, or in memory)."""
        return [self._vecs.data]

    def _search(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        n_main = self._n_main
        fetch, reorder = k, int(params.get("reorder") or 0)
        if mask is not None:  # over-fetch in proportion to what the mask hides in the main tier
            qual_main = int(np.searchsorted(mask.idx, n_main))
            fetch = math.ceil(k * n_main / max(qual_main, 1) * 1.2) + 10
            fetch = min(fetch, MAX_OVERFETCH * k + 100)
            # The re-scored pool too: the tuned reorder is what k rows need from the approximate scores,
            # and a mask keeps only its share of that pool (a random 15% filter: held-out recall@100
            # 0.85 with the pool unscaled, against 0.96 unfiltered).
            reorder = min(math.ceil(reorder * n_main / max(qual_main, 1)), MAX_OVERFETCH * reorder)
        fetch = min(fetch, n_main)
        leaves = int(params.get("leaves") or 0) if self._leaves else 0
        if mask is not None and leaves and params.get("filter_path") != "post":  # more leaves when few qualify
            leaves = min(self._leaves, math.ceil(leaves * n_main / max(qual_main, 1)))
        slots, scores = self._main(q, k, fetch, leaves, reorder, mask)
        if mask is not None and params.get("filter_path") == "filtered":
            # A filter that follows the vectors' clusters can hide every item of the first `fetch`
            # (and of the nearest leaves): rows left short search 4x more leaves and fetch 4x more,
            # twice, before the base class goes exact.
            for _ in range(REFETCH_ROUNDS):
                short = slots[:, k - 1] < 0
                if not short.any() or fetch >= n_main:
                    break
                fetch = min(fetch * 4, n_main)
                leaves = min(self._leaves, leaves * 4)
                slots[short], scores[short] = self._main(q[short], k, fetch, leaves, reorder, mask)
        if self.n_slots > n_main:  # delta tier: exact over items added since the build
            delta = self._vecs.data[n_main:]
            if mask is None:  # one pass with a heap: the live items of a drift run (200k) cost 2-3x less
                d_slots, d_scores = top_inner_products(q, delta, k, first_label=n_main)
            else:
                ds = np.where(mask.bits[n_main:], inner_products(q, delta), np.float32(-np.inf))
                d_slots, d_scores = topk_rows(ds, k, labels=np.arange(n_main, self.n_slots))
            slots, scores = merge_topk([slots, d_slots], [scores, d_scores], k)
        return slots, scores

    def _main(
        self, q: np.ndarray, k: int, fetch: int, leaves: int, reorder: int, mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN over the main tier: the `fetch` best of a re-scored pool of at least `reorder`, masked-out
        slots dropped, k per row (-1 padded)."""
        reorder = max(reorder, fetch)
        if self._leaves and self._rerank == RERANK_TOWERANN:
            return self._reranked(q, k, fetch, min(reorder, self._n_main), leaves or -1, mask)
        pre_reorder, leaves = reorder if self._leaves else -1, leaves or -1
        if len(q) == 1:  # the single-query entry point: less per-call work than a batch of one
            idx, dist = self._searcher.search(q[0], fetch, pre_reorder, leaves)
            idx, dist = idx[None, :], dist[None, :]
        else:
            idx, dist = self._searcher.search_batched(q, fetch, pre_reorder, leaves)
        slots = idx.astype(np.int64)
        scores = np.asarray(dist, np.float32)
        bad = ~np.isfinite(scores)  # ScaNN pads short rows with index 0, score NaN
        if mask is not None:
            bad |= ~mask.bits[slots]
        if bad.any():
            scores = np.where(bad, -np.inf, scores)
            return self._compact(slots, scores, k)
        if slots.shape[1] != k or (scores[:, :-1] < scores[:, 1:]).any():  # rows usually come sorted
            return self._compact(slots, scores, k)
        return slots, scores

    def _reranked(
        self, q: np.ndarray, k: int, fetch: int, pool: int, leaves: int, mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """What ScaNN's own reorder returned, re-scored here: the tree + AH search's `pool` best candidates
        per row, scored exactly against the stored vectors, the `fetch` best of them, masked-out slots
        dropped, k per row (-1 padded). The mask applies after the cut, as it did to ScaNN's rows: rows
        left short then take the same refetch rounds and exact fallback, which the tuned parameters and
        the filter plan were measured with."""
        if len(q) == 1:  # the single-query entry point; it returns a shorter row when the leaves hold fewer
            idx, dist = self._searcher.search(q[0], pool, pool, leaves)
            idx, dist = idx[None, :], dist[None, :]
        else:
            idx, dist = self._searcher.search_batched(q, pool, pool, leaves)
        slots = idx.astype(np.int64)
        slots[~np.isfinite(dist)] = -1  # ScaNN pads short rows with index 0, score NaN; scored -inf
        scores = scores_at(q, self._vecs.data, slots)
        if mask is None:  # fetch == k
            return self._compact(slots, scores, k)
        if fetch < slots.shape[1]:
            cols, scores = topk_rows(scores, fetch)
            slots = np.where(cols >= 0, np.take_along_axis(slots, np.maximum(cols, 0), axis=1), -1)
        scores = np.where((slots >= 0) & mask.bits[slots], scores, np.float32(-np.inf))
        return self._compact(slots, scores, k)

    @staticmethod
    def _compact(slots: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Keep each row's k best finite entries, sorted, -1/-inf padded."""
        cols, top = topk_rows(scores, k)
        out = np.take_along_axis(slots, np.maximum(cols, 0), axis=1)
        out[cols < 0] = -1
        return out, top

    def _save_backend(self, directory: Path) -> dict[str, Any]:
        save_npy(directory / "vectors.npy", self._vecs.data)
        state: dict[str, Any] = {
            "vectors": "vectors.npy",
            "n_main": self._n_main,
            "leaves": self._leaves,
            "scann_dir": None,
            "rerank": self._rerank,
        }
        if self._searcher is not None:
            (directory / "scann").mkdir()
            self._searcher.serialize(str(directory / "scann"), relative_path=True)
            state["scann_dir"] = "scann"
        return state

    def _load_backend(self, directory: Path, state: dict[str, Any]) -> None:
        self._vecs = self.load_saved_vectors(directory, state["vectors"], grows=True)
        self._n_main, self._leaves = int(state["n_main"]), int(state["leaves"])
        self._rerank = state.get("rerank", RERANK_SCANN)  # no field: written before towerann re-ranked
        if self._rerank not in (RERANK_TOWERANN, RERANK_SCANN):
            raise ArtifactError(
                f"{directory}: backend_state rerank {self._rerank!r} is neither {RERANK_TOWERANN!r} nor "
                f"{RERANK_SCANN!r}; a newer towerann wrote it, rebuild the index"
            )
        if state.get("scann_dir"):
            sdir = directory / state["scann_dir"]
            if (sdir / "scann_docids.pkl").exists():  # ScaNN would unpickle it; we never write one
                raise ArtifactError(f"{sdir / 'scann_docids.pkl'}: refusing to load a pickled file; rebuild the index")
            if _load_in_helper_process:
                from towerann.index.scann_process import SearcherProcess, SearcherProcessError

                _scann()  # a missing ScaNN: the same one-line BackendUnavailable as in process
                try:
                    self._searcher = SearcherProcess(sdir)
                except SearcherProcessError as e:
                    raise ArtifactError(str(e)) from e
                return
            try:
                self._searcher = _scann().load_searcher(str(sdir))
            except (RuntimeError, ValueError) as e:
                raise ArtifactError(f"{sdir}: ScaNN could not load it ({e})") from e

    def release_memory(self) -> int:
        """A searcher in a helper process is let go at once (its memory is the helper's); in process, the
        destructor frees it."""
        close = getattr(self._searcher, "close", None)
        if close is not None:
            close()
        return 0

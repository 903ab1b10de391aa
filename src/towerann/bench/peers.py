"""The peers of `towerann bench ann`: raw libraries called directly, LanceDB and numpy brute force.

Each builder returns one or more `Series` (one line of the recall/latency plot each). Search
parameters arrive in towerann's own terms (ef; nprobe + rerank; leaves + reorder) so a raw library
is measured at exactly the settings its towerann wrapper is measured at; LanceDB takes
nprobes + refine_factor. Every builder uses all cores; the caller sets thread counts for search.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from towerann.errors import BackendUnavailable

log = logging.getLogger(__name__)

SearchFn = Callable[[np.ndarray, int, dict[str, Any]], np.ndarray]  # (queries [m, d], k, params) -> ids [m, k]


@dataclass
class Series:
    """One index (or one way of querying it) measured over a parameter grid."""

    name: str  # plot label, e.g. "faiss HNSWFlat"
    system: str  # "towerann" or "peer"
    grid: str  # which parameter grid it sweeps: exact, hnsw, ivfpq, ivfpq+rerank, scann, lancedb
    search: SearchFn  # one call; single-query timing passes [1, d]
    search_batch: SearchFn  # all queries at once, all cores
    build_s: float
    memory_bytes: int  # on disk / in memory after build: what serving it costs
    description: str = ""
    wraps: str | None = None  # for a towerann series: the name of the raw series it wraps


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path`: what an index saved there costs on disk."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _pad(ids: np.ndarray, k: int) -> np.ndarray:
    """A [m, <=k] id block padded with -1 to [m, k]."""
    ids = np.asarray(ids, np.int64).reshape(len(ids), -1)
    if ids.shape[1] >= k:
        return ids[:, :k]
    return np.concatenate([ids, np.full((len(ids), k - ids.shape[1]), -1, np.int64)], axis=1)


# ---- numpy brute force ---------------------------------------------------------------------------


def numpy_series(vectors: np.ndarray) -> list[Series]:
    """Brute force: one gemv (single query) or gemm (batch) + argpartition; the memory-bandwidth floor."""

    def one(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        s = vectors @ q[0]
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top])][None, :]

    def batch(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        out = np.empty((len(q), k), np.int64)
        for s0 in range(0, len(q), 256):
            s = q[s0 : s0 + 256] @ vectors.T
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
            out[s0 : s0 + 256] = np.take_along_axis(top, order, axis=1)
        return out

    return [Series("numpy brute force", "peer", "exact", one, batch, 0.0, vectors.nbytes, "matmul + argpartition")]


# ---- faiss -----------------------------------------------------------------------------------------


def _faiss_bytes(ix: Any) -> int:
    import faiss

    with tempfile.TemporaryDirectory() as d:
        faiss.write_index(ix, f"{d}/ix")
        return Path(f"{d}/ix").stat().st_size


def faiss_hnsw_series(vectors: np.ndarray, M: int, ef_construction: int) -> list[Series]:
    import faiss

    t0 = time.perf_counter()
    ix = faiss.IndexHNSWFlat(vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    ix.hnsw.efConstruction = ef_construction
    ix.add(vectors)
    build_s = time.perf_counter() - t0

    def search(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        # faiss's bundled stub (__init__.pyi) lacks this SWIG class, which every faiss >= 1.7.3 has at run time
        p = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        p.efSearch = max(int(params["ef"]), k)
        return ix.search(q, k, params=p)[1]

    return [
        Series(
            "faiss HNSWFlat",
            "peer",
            "hnsw",
            search,
            search,
            build_s,
            _faiss_bytes(ix),
            f"IndexHNSWFlat M={M} efConstruction={ef_construction}",
        )
    ]


def faiss_ivfpq_series(
    vectors: np.ndarray, nlist: int, pq_m: int, nbits: int, train_sample: int, seed: int
) -> list[Series]:
    """IVF-PQ, queried plain and through IndexRefineFlat (faiss' own re-ranking with full vectors)."""
    import faiss

    n, d = vectors.shape
    t0 = time.perf_counter()
    base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    base.cp.seed = seed
    base.pq.cp.seed = seed
    m = min(n, max(train_sample, nlist * 64, 256 * 39))  # the sample towerann's ivfpq trains on
    sample = vectors if m >= n else vectors[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
    base.train(np.ascontiguousarray(sample))
    refine = faiss.IndexRefineFlat(base)
    refine.add(vectors)  # adds to the IVF-PQ base and keeps the full vectors for re-ranking
    build_s = time.perf_counter() - t0

    def ivf_params(params: dict[str, Any]) -> Any:
        p = faiss.SearchParametersIVF()
        p.nprobe = min(int(params["nprobe"]), nlist)
        return p

    def plain(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        return base.search(q, k, params=ivf_params(params))[1]

    def refined(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = max(int(params["rerank"]), k) / k
        p.base_index_params = ivf_params(params)
        return refine.search(q, k, params=p)[1]

    base_bytes = _faiss_bytes(base)
    desc = f"IVF{nlist},PQ{pq_m}x{nbits}"
    return [
        Series("faiss IVFPQ", "peer", "ivfpq", plain, plain, build_s, base_bytes, desc),
        Series(
            "faiss IVFPQ+RefineFlat",
            "peer",
            "ivfpq+rerank",
            refined,
            refined,
            build_s,
            base_bytes + vectors.nbytes,
            desc + ",RFlat",
        ),
    ]


# ---- hnswlib --------------------------------------------------------------------------------------


def hnswlib_series(vectors: np.ndarray, M: int, ef_construction: int, threads: int) -> list[Series]:
    try:
        import hnswlib
    except ImportError as e:
        raise BackendUnavailable(f"the hnswlib peer needs hnswlib: pip install 'towerann[bench]' ({e})") from e
    n, d = vectors.shape
    t0 = time.perf_counter()
    ix = hnswlib.Index(space="ip", dim=d)
    ix.init_index(max_elements=n, ef_construction=ef_construction, M=M, random_seed=100)
    ix.add_items(vectors, np.arange(n), num_threads=threads)
    build_s = time.perf_counter() - t0

    def one(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        ix.set_ef(max(int(params["ef"]), k))
        return ix.knn_query(q, k, num_threads=1)[0].astype(np.int64)

    def batch(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        ix.set_ef(max(int(params["ef"]), k))
        return ix.knn_query(q, k, num_threads=threads)[0].astype(np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        ix.save_index(f"{tmp}/ix.bin")
        nbytes = Path(f"{tmp}/ix.bin").stat().st_size
    return [
        Series(
            "hnswlib", "peer", "hnsw", one, batch, build_s, nbytes, f"hnswlib M={M} ef_construction={ef_construction}"
        )
    ]


# ---- ScaNN ----------------------------------------------------------------------------------------


def scann_series(
    vectors: np.ndarray,
    num_leaves: int,
    search_leaves: int,
    reorder: int,
    train_sample: int,
    quantization_threshold: float,
) -> list[Series]:
    """Raw ScaNN with the tree/AH/reorder build towerann's scann backend uses."""
    try:
        from scann.scann_ops.py import scann_ops_pybind as sp
    except ImportError as e:
        raise BackendUnavailable(f"the scann peer needs ScaNN: pip install scann ({e})") from e
    n = len(vectors)
    t0 = time.perf_counter()
    searcher = (
        sp.builder(vectors, min(10, n), "dot_product")
        .tree(num_leaves=num_leaves, num_leaves_to_search=search_leaves, training_sample_size=min(n, train_sample))
        .score_ah(2, anisotropic_quantization_threshold=quantization_threshold)
        .reorder(max(1, min(reorder, n)))
        .build()
    )
    build_s = time.perf_counter() - t0

    def one(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        idx, _ = searcher.search(q[0], k, max(int(params["reorder"]), k), int(params["leaves"]))
        return _pad(np.asarray(idx)[None, :], k)

    def batch(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        idx, _ = searcher.search_batched_parallel(q, k, max(int(params["reorder"]), k), int(params["leaves"]))
        return _pad(np.asarray(idx), k)

    with tempfile.TemporaryDirectory() as tmp:
        searcher.serialize(tmp)
        nbytes = dir_bytes(Path(tmp))
    return [
        Series(
            "ScaNN",
            "peer",
            "scann",
            one,
            batch,
            build_s,
            nbytes,
            f"tree{num_leaves},AH2(t={quantization_threshold}),reorder",
        )
    ]


# ---- LanceDB --------------------------------------------------------------------------------------


def lancedb_series(vectors: np.ndarray, workdir: Path, num_partitions: int, num_sub_vectors: int) -> list[Series]:
    """A local LanceDB table with an IVF_PQ index (dot product), queried with nprobes + refine_factor."""
    os.environ.setdefault("LANCE_LOG", "error")  # else a deprecation warning per query floods stderr
    try:
        import lancedb
        import pyarrow as pa
        from lancedb.query import LanceVectorQueryBuilder
    except ImportError as e:
        raise BackendUnavailable(f"the lancedb peer needs lancedb: pip install lancedb ({e})") from e
    n, d = vectors.shape
    t0 = time.perf_counter()
    db = lancedb.connect(str(workdir))
    data = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d),
        }
    )
    table = db.create_table("items", data, mode="overwrite")
    table.create_index(
        metric="dot",
        num_partitions=num_partitions,
        num_sub_vectors=num_sub_vectors,
        vector_column_name="vector",
        index_type="IVF_PQ",
    )
    build_s = time.perf_counter() - t0

    def one(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        # a vector query: search() is typed as returning the base builder, which has no distance_type
        vector_query = cast(LanceVectorQueryBuilder, table.search(q[0], vector_column_name="vector"))
        query = vector_query.distance_type("dot").nprobes(int(params["nprobes"])).limit(k).select(["id", "_distance"])
        if params.get("refine_factor"):
            query = query.refine_factor(int(params["refine_factor"]))
        return _pad(query.to_arrow()["id"].to_numpy()[None, :], k)

    def batch(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        # LanceDB answers one vector per query call; it parallelises inside the call
        return np.concatenate([one(q[i : i + 1], k, params) for i in range(len(q))])

    return [
        Series(
            "LanceDB IVF_PQ+refine",
            "peer",
            "lancedb",
            one,
            batch,
            build_s,
            dir_bytes(Path(workdir)),
            f"IVF_PQ partitions={num_partitions} sub_vectors={num_sub_vectors}",
        )
    ]

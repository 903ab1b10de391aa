"""`towerann bench ann`: recall vs latency of every towerann backend beside the library it wraps.

One run measures, on the same item vectors and the same *user-tower* query vectors:
recall@K against exact search, p50/p99 latency of one query at a time on ONE thread, batch QPS
(all queries at once, all cores), build time and bytes per item, for the towerann backends and
for their peers called directly (raw faiss, hnswlib, ScaNN, LanceDB, numpy brute force). It
reports towerann's overhead over the raw library it wraps (ratio of p50 at the same parameters),
recall for item vectors used as queries beside user queries (the out-of-distribution gap), and
the machine's SGEMM / memory-bandwidth ceilings (as `towerann bench machine` measures them).

By default it builds its own dataset (synthetic catalog -> trained two-tower model -> item
vectors + held-out users' query vectors), cached under --work so a second run reuses it.

`--set far` measures the hard case instead: a seeded synthetic vector catalog (Zipf-sized clusters,
power-law covariance spectrum; towerann.data.synth_vectors) with *far-off* queries, each the mean of a few
items plus noise - far from every item, like user-tower vectors drifted from the catalog the index
was built on. No model is trained; it writes ann-far.json + ann-far.png.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from towerann.artifacts import load_npy, read_manifest, save_npy, write_json_atomic
from towerann.bench.options import (
    add_backends,
    add_catalog,
    add_given_vectors,
    add_ks,
    add_out,
    add_quick,
    add_seed,
    parse_csv,
    parse_ks,
)
from towerann.errors import ArtifactError, ConfigError, DataError, TowerannError
from towerann.index.hnsw import HNSW_EF_STEPS
from towerann.index.tune import recall_at_k

if TYPE_CHECKING:
    from towerann.bench.peers import Series

log = logging.getLogger(__name__)

BACKENDS = ("exact", "hnsw", "ivfpq", "scann")
PEERS = ("faiss", "hnswlib", "scann", "lancedb", "numpy")
DATA_KIND = "bench-ann-data"
DATA_VERSION = 1
ITEMS, USERS = 1_000_000, 50_000  # the synthetic dataset by default
QUICK_ITEMS, QUICK_USERS = 20_000, 2_000  # and with --quick
TARGETS = {  # the goals this benchmark checks (set for 1M x 128-d, inner product, 2 cores)
    "recall@1000>=0.95 at p50<=1ms": {"k": 1000, "recall": 0.95, "p50_ms": 1.0},
    "recall@100>=0.95 at p50<=0.5ms": {"k": 100, "recall": 0.95, "p50_ms": 0.5},
    "hnsw memory <= 1.5x raw vectors": {"memory_ratio": 1.5},
    "towerann overhead over raw < 10%": {"overhead": 0.10},
}
FAR_TARGETS = {  # --set far: the target for far-off queries (1M x 128-d)
    "far-off: recall@100>=0.95 at p50<=1ms": {"k": 100, "recall": 0.95, "p50_ms": 1.0},
    "far-off: recall@1000>=0.95 at p50<=1ms": {"k": 1000, "recall": 0.95, "p50_ms": 1.0},
}
SETS = ("user", "far")  # --set: user-tower queries of a trained model, or far-off synthetic queries


# ---- dataset -------------------------------------------------------------------------------------


@dataclass
class Dataset:
    vectors: np.ndarray  # f32 [n, d] item vectors (ids = row numbers)
    queries: np.ndarray  # f32 [m, d] user-tower query vectors
    source: dict[str, Any] = field(default_factory=dict)


def synthetic_dataset(
    work: str | Path,
    n_items: int,
    n_users: int,
    dim: int = 128,
    max_queries: int = 5000,
    train_seconds: float = 300.0,
    seed: int = 0,
) -> Dataset:
    """Synthetic catalog -> trained model -> item vectors + held-out users' query vectors, cached in `work`."""
    from towerann.data.dataset import validate_dataset
    from towerann.data.synth import generate
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel, model_version_of
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    root = Path(work) / f"ann-{n_items}x{n_users}-d{dim}-s{seed}"
    data_dir = root / "dataset"
    done = root / "queries"
    if (done / "manifest.json").exists():
        m = read_manifest(done, DATA_KIND, DATA_VERSION)
        from towerann.data.vectors_dir import read_vectors

        vs = read_vectors(root / "vectors", verify=False)
        q = load_npy(done / "queries.npy", m["queries_sha256"])
        log.info("reusing cached dataset %s", root)
        return Dataset(vs.vectors, q, {**m["source"], "cache": str(root)})

    t0 = time.perf_counter()
    try:
        validate_dataset(data_dir)
    except DataError:
        shutil.rmtree(data_dir, ignore_errors=True)
        generate(data_dir, n_items, n_users, seed=seed)
    model_dir = root / "model"
    try:
        model_version_of(model_dir)
    except ArtifactError:
        shutil.rmtree(model_dir, ignore_errors=True)
        train(
            data_dir,
            model_dir,
            TowerConfig(dim=dim),
            TrainConfig(epochs=3, max_seconds=train_seconds, seed=seed),
            overwrite=True,
            progress=False,
        )
    model = TwoTowerModel.load(model_dir)
    vec_dir = root / "vectors"
    if not (vec_dir / "manifest.json").exists():
        from towerann.embed.runner import embed_catalog

        embed_catalog(model_dir, data_dir, vec_dir, overwrite=True, progress=False)
    from towerann.data.vectors_dir import read_vectors

    vs = read_vectors(vec_dir, verify=False)
    q = heldout_user_queries(model, data_dir, max_queries, seed)
    source = {
        "kind": "synthetic",
        "items": n_items,
        "users": n_users,
        "dim": dim,
        "seed": seed,
        "model_version": model.version,
        "queries": "user tower, held-out (test) users",
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    done.mkdir(parents=True, exist_ok=True)
    sha = save_npy(done / "queries.npy", q)
    write_json_atomic(
        done / "manifest.json",
        {"kind": DATA_KIND, "format_version": DATA_VERSION, "queries_sha256": sha, "count": len(q), "source": source},
    )
    return Dataset(vs.vectors, q, {**source, "cache": str(root)})


def far_dataset(n_items: int, dim: int = 128, n_queries: int = 5000, seed: int = 0) -> Dataset:
    """The far-off-query catalog of towerann.data.synth_vectors (seconds to generate, so never cached)."""
    from towerann.data.synth_vectors import far_off_catalog

    cat = far_off_catalog(n_items, n_queries, dim, seed=seed)
    return Dataset(
        cat.vectors, cat.queries, {"kind": "far-off synthetic", **cat.params, "queries_label": "far-off queries"}
    )


def given_dataset(vectors_dir: str | Path, queries_file: str | Path) -> Dataset:
    """Item vectors from a towerann vectors directory + query vectors from a .npy file."""
    from towerann.data.vectors_dir import read_vectors

    vs = read_vectors(vectors_dir)
    q = load_npy(queries_file)
    if q.ndim != 2 or q.shape[1] != vs.dim:
        raise DataError(
            f"{queries_file}: query vectors must be float [m, {vs.dim}] to match {vectors_dir}; "
            f"got shape {list(q.shape)}"
        )
    return Dataset(
        vs.vectors,
        q.astype(np.float32),
        {"kind": "given", "vectors": str(vectors_dir), "queries": str(queries_file), "model_version": vs.model_version},
    )


# ---- measuring -----------------------------------------------------------------------------------


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Limit BLAS, OpenMP (faiss) and torch to `n` threads inside the block."""
    import sys

    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    torch = sys.modules.get("torch")
    torch_before = torch.get_num_threads() if torch is not None else None
    faiss.omp_set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        faiss.omp_set_num_threads(before)
        if torch is not None and torch_before is not None:
            torch.set_num_threads(torch_before)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth: ids [m, k] of the k largest inner products, best first (in 256 MB score blocks)."""
    from towerann.index.merge import topk_blocked

    k = min(k, len(vectors))
    return topk_blocked(queries, k, lambda b: b @ vectors.T, len(vectors))[0]


def grids(k: int, quick: bool, nlist: int, leaves: int) -> dict[str, list[dict[str, Any]]]:
    """Search parameters per grid, cheapest first; a raw library and its wrapper sweep the same list."""
    # hnsw: the tuner's ef steps (index.hnsw.HNSW_EF_STEPS) up to 12k
    ef_f = (1, 2, 4) if quick else tuple(f for f in HNSW_EF_STEPS if f <= 12)
    probes = (8, 32, 128) if quick else (4, 8, 16, 32, 64, 128, 256, 512)
    # Re-rank pools (x k): far-off queries need deeper pools than 4k, whose quantized scores sit close together.
    pools = (4,) if quick else (2, 4, 8)
    nprobes = sorted({min(p, nlist) for p in probes})
    lv = sorted({min(p, leaves) for p in probes}) if leaves else [0]
    return {
        "exact": [{}],
        "hnsw": [{"ef": int(max(k, 16) * f)} for f in ef_f],
        "ivfpq": [{"nprobe": p, "rerank": 0} for p in nprobes],
        "ivfpq+rerank": [{"nprobe": p, "rerank": f * k} for p in nprobes for f in pools],
        "scann": [{"leaves": x, "reorder": f * k} for x in lv for f in pools],
        "lancedb": [{"nprobes": p, "refine_factor": 4} for p in nprobes],
    }


def towerann_series(kind: str, vectors: np.ndarray) -> tuple[list[Series], Any]:
    """Build one towerann backend; return its series (ivfpq: plain and re-ranked) and the index."""
    from towerann.bench.peers import Series, dir_bytes
    from towerann.index import create

    t0 = time.perf_counter()
    ix = create(kind, vectors.shape[1])
    ix.build(vectors, np.arange(len(vectors), dtype=np.int64))
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ix.save(Path(tmp))
        nbytes = dir_bytes(Path(tmp))

    def search(q: np.ndarray, k: int, params: dict[str, Any]) -> np.ndarray:
        return ix.search(q, k, params=params or None).ids

    desc = ix.describe()
    if kind == "exact":
        return [
            Series(
                "towerann exact", "towerann", "exact", search, search, build_s, nbytes, desc, wraps="numpy brute force"
            )
        ], ix
    if kind == "hnsw":
        return [
            Series("towerann hnsw", "towerann", "hnsw", search, search, build_s, nbytes, desc, wraps="faiss HNSWFlat")
        ], ix
    if kind == "ivfpq":
        return [
            Series("towerann ivfpq", "towerann", "ivfpq", search, search, build_s, nbytes, desc, wraps="faiss IVFPQ"),
            Series(
                "towerann ivfpq+rerank",
                "towerann",
                "ivfpq+rerank",
                search,
                search,
                build_s,
                nbytes,
                desc + " + rerank",
                wraps="faiss IVFPQ+RefineFlat",
            ),
        ], ix
    if kind == "scann":
        return [Series("towerann scann", "towerann", "scann", search, search, build_s, nbytes, desc, wraps="ScaNN")], ix
    raise ConfigError(f"unknown backend {kind!r} for --backends; choose from {', '.join(BACKENDS)}")


def measure_point(
    series: Series, queries: np.ndarray, k: int, params: dict[str, Any], truth: np.ndarray, cores: int
) -> dict[str, Any]:
    """Recall + single-query latency on one thread, then batch QPS on all cores, at one setting."""
    from towerann.bench.report import percentiles

    m = len(queries)
    found = np.full((m, k), -1, np.int64)
    times = np.empty(m)
    with threads(1):
        for i in range(min(3, m)):  # warm-up: caches, lazy allocations
            series.search(queries[i : i + 1], k, params)
        for i in range(m):
            t0 = time.perf_counter()
            ids = series.search(queries[i : i + 1], k, params)
            times[i] = time.perf_counter() - t0
            found[i] = np.asarray(ids).reshape(-1)[:k]
    with threads(cores):
        t0 = time.perf_counter()
        batch_ids = series.search_batch(queries, k, params)
        batch_s = time.perf_counter() - t0
    lat = percentiles(times)
    return {
        "series": series.name,
        "k": k,
        "params": params,
        "recall": recall_at_k(found, truth[:, :k]),
        "recall_batch": recall_at_k(np.asarray(batch_ids), truth[:, :k]),
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "mean_ms": lat["mean_ms"],
        "qps_batch": m / batch_s,
    }


def machine_ceilings() -> dict[str, Any]:
    """This machine's SGEMM and memory bandwidth (`towerann bench machine`'s sizes): the ceilings beside the results."""
    from towerann.bench.report import memory_bandwidth_gbs, sgemm_gflops

    return {
        "sgemm_gflops_1_thread": sgemm_gflops(1),
        "sgemm_gflops_all_cores": sgemm_gflops(None),
        "memory_bandwidth_gbs": memory_bandwidth_gbs(),
    }


def run_ann_bench(
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    ks: tuple[int, ...] = (100, 1000),
    backends: tuple[str, ...] = BACKENDS,
    peers: tuple[str, ...] = PEERS,
    n_queries: int = 300,
    quick: bool = False,
    out: str | Path | None = "bench-results",
    work: str | Path | None = None,
    source: dict[str, Any] | None = None,
    max_p50_ms: float = 200.0,
    seed: int = 0,
    report: str = "ann",
    targets: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Measure every backend and peer on these vectors and queries; write REPORT.json + REPORT.png to `out`
    (`targets`: the goals checked, TARGETS unless given)."""
    from towerann.bench.peers import (
        faiss_hnsw_series,
        faiss_ivfpq_series,
        hnswlib_series,
        lancedb_series,
        numpy_series,
        scann_series,
    )
    from towerann.bench.report import write_report
    from towerann.index import create
    from towerann.index.ivfpq import IVFPQIndex

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if vectors.ndim != 2 or queries.ndim != 2 or vectors.shape[1] != queries.shape[1]:
        raise DataError(f"vectors {list(vectors.shape)} and queries {list(queries.shape)} must be [n, d] and [m, d]")
    bad_b = set(backends) - set(BACKENDS)
    bad_p = set(peers) - set(PEERS)
    if bad_b or bad_p:
        raise ConfigError(
            f"unknown --backends {sorted(bad_b)} / --peers {sorted(bad_p)}; "
            f"backends: {', '.join(BACKENDS)}; peers: {', '.join(PEERS)}"
        )
    n, dim = vectors.shape
    if not ks or min(ks) < 1 or max(ks) > n:
        raise ConfigError(f"--k values must be between 1 and the number of items ({n}), got {list(ks)}")
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(seed)
    if len(queries) > n_queries:
        queries = queries[np.sort(rng.choice(len(queries), n_queries, replace=False))]
    item_q = vectors[np.sort(rng.choice(n, min(n_queries, n), replace=False))]
    t_run = time.perf_counter()
    with threads(cores):
        truth = exact_topk(vectors, queries, max(ks))
        truth_items = exact_topk(vectors, item_q, max(ks))

    # ---- build: towerann first, then the raw libraries with the build params towerann chose
    all_series: list[Any] = []
    built: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for kind in backends:
        try:
            s, ix = towerann_series(kind, vectors)
        except TowerannError as e:  # an optional backend missing: say so in the report, keep going
            skipped[f"towerann {kind}"] = str(e)
            continue
        all_series += s
        built[kind] = ix
        log.info("built towerann %s in %.1fs", kind, s[0].build_s)
    # The raw libraries get the build params towerann chose (its own defaults where it built nothing).
    hp = (built.get("hnsw") or create("hnsw", dim)).build_params
    ivf = built.get("ivfpq") or create("ivfpq", dim)
    assert isinstance(ivf, IVFPQIndex)
    nlist = ivf.nlist or ivf.nlist_for(n)
    ivf_p = ivf.build_params
    sc = built.get("scann")
    leaves = sc.leaves if sc is not None else 0  # 0: no scann grid (neither towerann's nor the raw one runs)
    if sc is None and "scann" in peers:
        skipped["scann"] = "towerann's scann backend was not built, so its build params are unknown"
        peers = tuple(p for p in peers if p != "scann")
    peer_builders: list[tuple[str, Callable[[], list[Any]]]] = []
    if "numpy" in peers:
        peer_builders.append(("numpy", lambda: numpy_series(vectors)))
    if "faiss" in peers:
        peer_builders.append(("faiss hnsw", lambda: faiss_hnsw_series(vectors, hp["M"], hp["ef_construction"])))
        peer_builders.append(
            (
                "faiss ivfpq",
                lambda: faiss_ivfpq_series(
                    vectors, nlist, ivf_p["pq_m"], ivf_p["nbits"], ivf_p["train_sample"], ivf_p["seed"]
                ),
            )
        )
    if "hnswlib" in peers:
        peer_builders.append(("hnswlib", lambda: hnswlib_series(vectors, hp["M"], hp["ef_construction"], cores)))
    if "scann" in peers and sc is not None:
        sp = sc.build_params
        search_leaves = sc.search_defaults.get("leaves") or max(1, leaves // 5)
        peer_builders.append(
            (
                "scann",
                lambda: scann_series(
                    vectors, leaves, search_leaves, sp["reorder"], sp["train_sample"], sp["quantization_threshold"]
                ),
            )
        )
    lance_tmp = None
    if "lancedb" in peers:
        lance_tmp = Path(tempfile.mkdtemp(prefix="ann-lancedb-", dir=work))
        peer_builders.append(("lancedb", lambda: lancedb_series(vectors, lance_tmp, nlist, ivf_p["pq_m"])))
    try:
        for name, build in peer_builders:
            try:
                s = build()
            except TowerannError as e:
                skipped[name] = str(e)
                continue
            all_series += s
            log.info("built %s in %.1fs", name, s[0].build_s)

        # ---- sweep
        from tqdm import tqdm

        points: list[dict[str, Any]] = []
        grid_by_k = {k: grids(k, quick, nlist, leaves) for k in ks}
        todo = [(s, k) for s in all_series for k in ks]
        for s, k in tqdm(todo, desc="ann sweep", unit="series", disable=None):
            too_slow: list[dict[str, Any]] = []
            for params in grid_by_k[k][s.grid]:
                if any(all(params[x] >= slow[x] for x in slow) for slow in too_slow):
                    continue  # at least as much work as a setting already over max_p50_ms
                pt = measure_point(s, queries, k, params, truth, cores)
                if s.system == "towerann":  # the same setting with item vectors as queries: the OOD gap
                    with threads(cores):
                        pt["recall_item_queries"] = recall_at_k(
                            np.asarray(s.search_batch(item_q, k, params)), truth_items[:, :k]
                        )
                points.append(pt)
                log.info("%s k=%d %s recall=%.4f p50=%.3fms", s.name, k, params, pt["recall"], pt["p50_ms"])
                if pt["p50_ms"] > max_p50_ms:
                    too_slow.append(params)
    finally:
        if lance_tmp is not None:
            shutil.rmtree(lance_tmp, ignore_errors=True)

    raw_bytes = 4 * dim
    series_info = [
        {
            "name": s.name,
            "system": s.system,
            "grid": s.grid,
            "description": s.description,
            "wraps": s.wraps,
            "build_s": s.build_s,
            "memory_bytes_per_item": s.memory_bytes / n,
            "memory_ratio_to_raw_vectors": s.memory_bytes / n / raw_bytes,
        }
        for s in all_series
    ]
    result: dict[str, Any] = {
        "dataset": {
            "items": n,
            "dim": dim,
            "queries": len(queries),
            "item_queries": len(item_q),
            "source": source or {"kind": "arrays"},
        },
        "ks": list(ks),
        "quick": quick,
        "cores": cores,
        "single_query_threads": 1,
        "series": series_info,
        "points": points,
        "skipped": skipped,
        "overhead": overheads(points, all_series),
        "in_turns": in_turns(points, all_series, queries),
        "machine_ceilings": machine_ceilings(),
        "run_s": time.perf_counter() - t_run,
    }
    result["brute_force_floor"] = brute_force_floor(result, n, dim)
    result["targets"] = check_targets(result, TARGETS if targets is None else targets)
    if out is not None:
        json_path, png_path = write_report(out, report, result, plot(result, TARGETS if targets is None else targets))
        result["files"] = [str(json_path), str(png_path)]
    return result


def fastest_reaching(points: list[dict[str, Any]], k: int, recall: float) -> dict[str, dict[str, Any]]:
    """Per series, its fastest sweep point at K with recall >= `recall` (series that never reach it: absent)."""
    best: dict[str, dict[str, Any]] = {}
    for p in points:
        if (
            p["k"] == k
            and p["recall"] >= recall
            and (p["series"] not in best or p["p50_ms"] < best[p["series"]]["p50_ms"])
        ):
            best[p["series"]] = p
    return best


TURN_ROUNDS = 9  # in_turns: rounds of turns per pair (each times both series over every query)


def in_turns(
    points: list[dict[str, Any]], all_series: list[Any], queries: np.ndarray, recall: float = 0.95
) -> list[dict[str, Any]]:
    """Each towerann series against each peer of its kind (same grid), at each one's fastest sweep setting
    reaching `recall`, timed again in turns (index.interleaved: TURN_ROUNDS rounds, each timing both on
    the same queries): the sweep times one series after another, minutes apart, and this machine's speed
    drifts between them (one setting's p50 0.19 then 0.21 ms, its peer's 0.18 then 0.14 ms in two runs of
    the 1M user-tower set, the second with towerann's leaner search path); within a round the two are
    timed back to back. `paired_ratio` is the median over rounds of towerann's p50 over the peer's."""
    from towerann.index.interleaved import Contender, medians, timed_in_turns
    from towerann.index.tune import one_query_p50_ms

    def timer(kind: str, params: dict[str, Any] | None, search: Callable[[np.ndarray], Any], q: np.ndarray) -> float:
        return one_query_p50_ms(search, q, n=len(q))

    out = []
    for k in sorted({p["k"] for p in points}):
        best = fastest_reaching(points, k, recall)
        for ours in all_series:
            for peer in all_series:
                if ours.system != "towerann" or peer.system == "towerann" or peer.grid != ours.grid:
                    continue
                if ours.name not in best or peer.name not in best:
                    continue
                pair = [(s.name, best[s.name]["params"], s) for s in (ours, peer)]
                contenders: list[Contender] = [
                    (name, params, functools.partial(s.search, k=k, params=params)) for name, params, s in pair
                ]
                rounds = timed_in_turns(contenders, queries, timer, rounds=TURN_ROUNDS)
                out.append(
                    {
                        "k": k,
                        "series": ours.name,
                        "peer": peer.name,
                        "params": [params for _, params, _ in pair],
                        "recall": [best[name]["recall"] for name, _, _ in pair],
                        "rounds": TURN_ROUNDS,
                        "p50_ms": medians(rounds),
                        "paired_ratio": float(np.median(rounds[:, 0] / rounds[:, 1])),
                    }
                )
                log.info("%s vs %s, k=%d, in turns: %.3fx", ours.name, peer.name, k, out[-1]["paired_ratio"])
    return out


def overheads(points: list[dict[str, Any]], all_series: list[Any]) -> list[dict[str, Any]]:
    """towerann p50 / raw p50 - 1 at identical parameters, per wrapped pair and K."""
    by_key = {(p["series"], p["k"], repr(sorted(p["params"].items()))): p for p in points}
    out = []
    for s in all_series:
        if not s.wraps:
            continue
        for p in points:
            if p["series"] != s.name:
                continue
            raw = by_key.get((s.wraps, p["k"], repr(sorted(p["params"].items()))))
            if raw is None:
                continue
            out.append(
                {
                    "series": s.name,
                    "raw": s.wraps,
                    "k": p["k"],
                    "params": p["params"],
                    "p50_ratio": p["p50_ms"] / raw["p50_ms"],
                    "overhead": p["p50_ms"] / raw["p50_ms"] - 1,
                    "overhead_ms": p["p50_ms"] - raw["p50_ms"],
                }
            )
    return out


def brute_force_floor(result: dict[str, Any], n: int, dim: int) -> dict[str, Any] | None:
    """What memory bandwidth and SGEMM allow brute force, beside what numpy achieved."""
    ceil = result.get("machine_ceilings")
    if not ceil:
        return None
    floor_ms = n * dim * 4 / (ceil["memory_bandwidth_gbs"] * 1e9) * 1e3  # one full read of the vectors
    qps_ceiling = ceil["sgemm_gflops_all_cores"] * 1e9 / (2.0 * n * dim)
    out: dict[str, Any] = {"single_query_ms_at_bandwidth": floor_ms, "batch_qps_at_sgemm": qps_ceiling}
    for p in result["points"]:
        if p["series"] in ("numpy brute force", "towerann exact"):
            out[f"{p['series']} k={p['k']}"] = {
                "p50_over_floor": p["p50_ms"] / floor_ms,
                "qps_fraction_of_sgemm": p["qps_batch"] / qps_ceiling,
            }
    return out


def check_targets(result: dict[str, Any], targets: dict[str, dict[str, Any]] = TARGETS) -> dict[str, Any]:
    """Per target: which series meet it (fastest point at the recall bar)."""
    out: dict[str, Any] = {}
    for name, t in targets.items():
        if "k" in t:
            per = {
                series: {
                    "p50_ms": p["p50_ms"],
                    "recall": p["recall"],
                    "params": p["params"],
                    "met": p["p50_ms"] <= t["p50_ms"],
                }
                for series, p in fastest_reaching(result["points"], t["k"], t["recall"]).items()
            }
            out[name] = {"target": t, "fastest_at_recall": per, "met_by": sorted(s for s, v in per.items() if v["met"])}
        elif "memory_ratio" in t:
            ratios = {s["name"]: s["memory_ratio_to_raw_vectors"] for s in result["series"] if s["grid"] == "hnsw"}
            out[name] = {
                "target": t,
                "ratios": ratios,
                "met_by": sorted(s for s, r in ratios.items() if r <= t["memory_ratio"]),
            }
        else:
            med: dict[str, list[float]] = {}
            for o in result["overhead"]:
                med.setdefault(o["series"], []).append(o["overhead"])
            medians = {s: float(np.median(v)) for s, v in med.items()}
            out[name] = {
                "target": t,
                "median_overhead": medians,
                "met_by": sorted(s for s, v in medians.items() if v < t["overhead"]),
            }
    return out


def frontier(pts: list[dict[str, Any]], key: str = "recall") -> list[dict[str, Any]]:
    """The points no faster point beats on recall, by p50: one line per series even over a 2-knob grid."""
    out: list[dict[str, Any]] = []
    for p in sorted(pts, key=lambda p: p["p50_ms"]):
        if not out or p[key] > out[-1][key]:
            out.append(p)
    return out


def plot(result: dict[str, Any], targets: dict[str, dict[str, Any]] = TARGETS) -> Callable[[Any], None]:
    """Recall vs p50 (log x), a panel per K, one line per series (its best recall at each latency);
    last panel: the run's queries vs item vectors as queries."""
    label = result["dataset"]["source"].get("queries_label", "user-tower queries")

    def draw(fig: Any) -> None:
        ks = result["ks"]
        fig.set_size_inches(6 * (len(ks) + 1), 6)
        names = [s["name"] for s in result["series"]]
        styles = {n: ("-" if s["system"] == "towerann" else "--") for n, s in zip(names, result["series"])}
        colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
        for j, k in enumerate(ks):
            ax = fig.add_subplot(1, len(ks) + 1, j + 1)
            for name in names:
                pts = frontier([p for p in result["points"] if p["series"] == name and p["k"] == k])
                if pts:
                    ax.plot(
                        [p["p50_ms"] for p in pts],
                        [p["recall"] for p in pts],
                        styles[name],
                        marker="o",
                        ms=3,
                        color=colors[name],
                        label=name,
                    )
            t = next((v for v in targets.values() if v.get("k") == k), None)
            if t:
                ax.axhline(t["recall"], color="grey", lw=0.8, ls=":")
                ax.axvline(t["p50_ms"], color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("p50 latency, one query on 1 thread (ms)")
            ax.set_ylabel(f"recall@{k} ({label})")
            ax.set_title(f"K={k}: {result['dataset']['items']:,} items x {result['dataset']['dim']}-d")
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7)
        ax = fig.add_subplot(1, len(ks) + 1, len(ks) + 1)
        for name in names:
            for k, marker in zip(ks, "os^v"):
                pts = [
                    p for p in result["points"] if p["series"] == name and p["k"] == k and "recall_item_queries" in p
                ]
                if len(pts) < 2:
                    continue
                items = frontier(pts, "recall_item_queries")
                ax.plot(
                    [p["p50_ms"] for p in items],
                    [p["recall_item_queries"] for p in items],
                    ":",
                    marker=marker,
                    ms=3,
                    color=colors[name],
                    label=f"{name} @{k}: item queries",
                )
                pts = frontier(pts)
                ax.plot(
                    [p["p50_ms"] for p in pts],
                    [p["recall"] for p in pts],
                    "-",
                    marker=marker,
                    ms=3,
                    color=colors[name],
                    label=f"{name} @{k}: {label}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel("recall")
        ax.set_title(f"{label} (solid) vs item vectors as queries (dotted)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)

    return draw


# ---- CLI -----------------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    series = {s["name"]: s for s in result["series"]}
    over = {(o["series"], o["k"], repr(o["params"])): o["overhead"] for o in result["overhead"]}
    print(
        f"{'series':<24}{'K':>5}  {'params':<30}{'recall':>8}{'itemQ':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'QPS':>9}{'B/item':>8}{'build s':>9}{'overhd':>8}"
    )
    for p in result["points"]:
        s = series[p["series"]]
        o = over.get((p["series"], p["k"], repr(p["params"])))
        params = ",".join(f"{k}={v}" for k, v in p["params"].items()) or "-"
        iq = p.get("recall_item_queries")
        print(
            f"{p['series']:<24}{p['k']:>5}  {params:<30}{p['recall']:>8.4f}{'' if iq is None else f'{iq:.4f}':>8}"
            f"{p['p50_ms']:>9.3f}{p['p99_ms']:>9.3f}{p['qps_batch']:>9.0f}{s['memory_bytes_per_item']:>8.0f}"
            f"{s['build_s']:>9.1f}{'' if o is None else f'{o:+.0%}':>8}"
        )
    for name, t in result["targets"].items():
        print(f"target {name}: met by {', '.join(t['met_by']) or 'none'}")
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")


def catalog_size(args: argparse.Namespace) -> tuple[int, int]:
    """(items, users) of the synthetic dataset (`bench ann`, `bench pq`): --items and --users, else the
    --quick or the full defaults."""
    items = QUICK_ITEMS if args.quick and args.items is None else (args.items or ITEMS)
    return items, args.users or (QUICK_USERS if args.quick else USERS)


def run(args: argparse.Namespace) -> int:
    ks = parse_ks(args.k)
    backends = parse_csv(args.backends, "--backends")
    peers = parse_csv(args.peers, "--peers") if args.peers.strip() else ()
    work = Path(args.work) if args.work else Path(args.out) / "work"
    if bool(args.vectors) != bool(args.queries):
        raise ConfigError(
            "--vectors and --queries go together: give both (a vectors directory and a .npy of "
            "query vectors) or neither (build a synthetic dataset)"
        )
    if args.vectors and args.set == "far":
        raise ConfigError("--set far generates its own catalog; give --vectors/--queries only with --set user")
    items, users = catalog_size(args)
    if args.vectors:
        data = given_dataset(args.vectors, args.queries)
    elif args.set == "far":
        data = far_dataset(items, args.dim, n_queries=5000, seed=args.seed)
    else:
        data = synthetic_dataset(work, items, users, args.dim, train_seconds=60 if args.quick else args.train_seconds)
    n_queries = args.queries_n or (100 if args.quick else 300)
    work.mkdir(parents=True, exist_ok=True)
    far = args.set == "far"
    result = run_ann_bench(
        data.vectors,
        data.queries,
        ks=ks,
        backends=backends,
        peers=peers,
        n_queries=n_queries,
        quick=args.quick,
        out=args.out,
        work=work,
        source=data.source,
        report="ann-far" if far else "ann",
        targets=FAR_TARGETS if far else TARGETS,
    )
    print_table(result)
    print(f"wrote {' and '.join(result['files'])}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "ann",
        help="recall vs latency of each index backend beside the raw libraries, LanceDB and brute force",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--set",
        choices=SETS,
        default="user",
        help="user: a trained model's item vectors and held-out "
        "users' query vectors (default); far: the far-off-query catalog (Zipf clusters, power-law spectrum, "
        "queries = mean of 3-8 items + noise; towerann.data.synth_vectors), written as ann-far.json/png",
    )
    add_seed(p, "--set far: catalog seed; the same seed gives the same vectors")
    add_catalog(p, ITEMS, users=USERS, quick=(QUICK_ITEMS, QUICK_USERS), trained=True)
    p.add_argument("--train-seconds", type=float, default=300.0, help="cap on model training time (default 300)")
    add_given_vectors(p)
    add_ks(p)
    p.add_argument("--queries-n", type=int, default=None, help="queries measured (default 300; --quick: 100)")
    add_backends(p, BACKENDS, "towerann backends")
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"peers measured beside them (default {','.join(PEERS)}; empty for none)",
    )
    add_quick(p, "small dataset and few parameter settings (smoke run)")
    add_out(p, "ann.json and ann.png, or ann-far.* with --set far")
    p.add_argument("--work", default=None, help="cache for dataset, model, vectors, queries (default OUT/work)")
    p.set_defaults(func=run)

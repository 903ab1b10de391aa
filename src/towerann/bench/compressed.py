"""`towerann bench pq`: the compressed index (ivfpq) - resident bytes, recall and warm/cold latency.

Per code size (`--pq-m`: bytes per item of PQ code at 8 bits a sub-quantizer) it builds an ivfpq
index once and, per re-rank row type (`--rerank-dtype`: float32, float16, int8), publishes it and
loads it back the way a server does: PQ codes (mapped from the snapshot), category codes and flag
bits in RAM; the slot -> id table, the id lookup and the full vectors in the snapshot's files, read
only for what a query returns or re-ranks (slots in inverted-list order: a query's re-rank rows
are about one run of pages per probed list). Then, one query at a time on one thread, over a grid
of nprobe x re-rank depth, at each K:

- warm: the re-rank file in the page cache (read through once before the warm runs);
- cold: the vector files' pages evicted from this process and from the page cache before *each*
  measured query (madvise DONTNEED + posix_fadvise DONTNEED on those files alone; no system setting
  changes), so the re-rank reads are disk reads - fewer queries, since each waits for the disk;
- in RAM: the same snapshot with rerank_from="memory" (the re-rank rows read into the process).

Reported per code size and row type: resident bytes per item (ivfpq's own accounting, per table,
which a test checks against the process's memory growth), disk bytes per item, build time and the
build's peak RSS, and recall@K against exact search. Writes pq.json + pq.png (with several row
types: pq-<dtype>.json + .png each).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.ann import (
    ITEMS,
    QUICK_ITEMS,
    QUICK_USERS,
    USERS,
    catalog_size,
    exact_topk,
    far_dataset,
    frontier,
    given_dataset,
    synthetic_dataset,
    threads,
)
from towerann.bench.options import (
    add_catalog,
    add_given_vectors,
    add_ks,
    add_out,
    add_quick,
    add_seed,
    parse_csv,
    parse_ks,
)
from towerann.errors import ConfigError

log = logging.getLogger(__name__)

# Issue 27's targets (set for 10M x 128-d user-tower queries, one query on one thread): 16-byte codes,
# at most 20 resident bytes per item, recall >= 0.95 with re-ranking.
TARGETS: dict[str, dict[str, Any]] = {
    "PQ16, resident<=20B/item, recall@100>=0.95, warm p50<=2ms": {
        "k": 100,
        "recall": 0.95,
        "p50_ms": 2.0,
        "mode": "warm",
        "resident": 20,
        "code_bytes": 16,
    },
    "PQ16, resident<=20B/item, recall@1000>=0.95, warm p50<=5ms": {
        "k": 1000,
        "recall": 0.95,
        "p50_ms": 5.0,
        "mode": "warm",
        "resident": 20,
        "code_bytes": 16,
    },
    "PQ16, resident<=20B/item, recall@100>=0.95, cold p50<=10ms": {
        "k": 100,
        "recall": 0.95,
        "p50_ms": 10.0,
        "mode": "cold",
        "resident": 20,
        "code_bytes": 16,
    },
}
NPROBES = (8, 16, 32, 64, 128, 256)
MODES = ("warm", "cold", "ram")
POOLS = (0, 2, 4, 8, 16)  # re-rank depth in multiples of K (0: the codes' own order)


def _peak_rss_reset() -> None:
    """Reset this process's peak-RSS mark (VmHWM), so the next build's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_pq_bench(
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    ks: tuple[int, ...] = (100, 1000),
    pq_ms: tuple[int, ...] = (8, 16, 32),
    rerank_dtypes: tuple[str, ...] = ("float32",),
    modes: tuple[str, ...] = MODES,
    n_queries: int = 300,
    n_cold: int = 40,
    quick: bool = False,
    grid: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    out: str | Path | None = "bench-results",
    work: str | Path | None = None,
    source: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the grid; return the result (with several rerank_dtypes: {"runs": {dtype: result}}, one file each)."""
    from towerann.bench.freshness import rss_mb
    from towerann.bench.report import begin_run, write_report
    from towerann.index import create
    from towerann.index.ivfpq import IVFPQIndex
    from towerann.index.snapshot import publish, read_checked_manifest

    start = begin_run()  # every file of this run records the same start
    n, dim = vectors.shape
    rng = np.random.default_rng(seed)
    if len(queries) > n_queries:
        queries = queries[np.sort(rng.choice(len(queries), n_queries, replace=False))]
    cold_q = queries[:n_cold]
    t_run = time.perf_counter()
    with threads(os.cpu_count() or 1):
        truth = exact_topk(vectors, queries, max(ks))
    nprobes, pools = grid or (((8, 32, 128), (0, 4)) if quick else (NPROBES, POOLS))
    codes: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    for pq_m in pq_ms:
        if dim % pq_m:
            raise ConfigError(f"--pq-m {pq_m} must divide the dimension {dim}")
        _peak_rss_reset()
        rss0 = rss_mb(os.getpid())[0]
        t0 = time.perf_counter()
        built = create("ivfpq", dim, pq_m=pq_m, rerank_dtype=rerank_dtypes[0])
        built.build(vectors, np.arange(n, dtype=np.int64))
        build_s = time.perf_counter() - t0
        build_peak = rss_mb(os.getpid())[1]
        assert isinstance(built, IVFPQIndex)
        loaded: dict[str, tuple[Any, Any]] = {}
        roots = []
        for dtype in rerank_dtypes:
            built.set_rerank_dtype(dtype)  # one build, a snapshot per row type
            root = Path(tempfile.mkdtemp(prefix=f"pq{pq_m}-{dtype}-", dir=work))
            roots.append(root)
            t1 = time.perf_counter()
            path = publish(built, root, "bench-pq")
            publish_s = time.perf_counter() - t1
            manifest = read_checked_manifest(path, verify=False)
            on_disk = IVFPQIndex.load(path, manifest)
            in_ram = (
                IVFPQIndex.load(
                    path, {**manifest, "build_params": {**manifest["build_params"], "rerank_from": "memory"}}
                )
                if "ram" in modes
                else None
            )
            assert isinstance(on_disk, IVFPQIndex)  # load() is typed as Index's
            loaded[dtype] = (on_disk, in_ram)
            mem = on_disk.memory(as_loaded=True)
            info = {
                "pq_m": pq_m,
                "rerank_dtype": dtype,
                "code_bytes": mem["codes_bytes_per_item"],
                "description": on_disk.describe(),
                "build_s": build_s,
                "publish_s": publish_s,
                "build_peak_rss_mb": build_peak,
                "rss_before_build_mb": rss0,
                "resident_bytes_per_item": mem["resident_bytes_per_item"],
                "resident_bytes_per_item_by_table": mem.get("resident_bytes_per_item_by_table"),
                "resident_bytes_per_item_in_ram": (
                    in_ram.memory(as_loaded=True)["resident_bytes_per_item"] if in_ram is not None else None
                ),
                "disk_bytes_per_item": mem["disk_bytes_per_item"],
                "mapped_tables_bytes_per_item": mem["mapped_tables_bytes_per_item"],
                "snapshot_bytes_per_item": sum(f.stat().st_size for f in path.iterdir()) / n,
                "manifest_memory": manifest["backend_state"].get("memory"),
            }
            codes.append(info)
            log.info(
                "pq_m=%d %s: built in %.0fs, peak RSS %.0f MiB, resident %.1f B/item",
                pq_m,
                dtype,
                build_s,
                build_peak,
                mem["resident_bytes_per_item"],
            )
        points += _measure(loaded, queries, cold_q, truth, ks, nprobes, pools, pq_m, modes)
        del loaded
        for root in roots:  # a snapshot per code size and row type: at 10M items, 5 GB of vectors each
            shutil.rmtree(root, ignore_errors=True)
        del built
    result: dict[str, Any] = {
        "dataset": {
            "items": n,
            "dim": dim,
            "queries": len(queries),
            "cold_queries": len(cold_q),
            "source": source or {"kind": "arrays"},
        },
        "ks": list(ks),
        "quick": quick,
        "grid": {"nprobe": list(nprobes), "rerank_x_k": list(pools)},
        "single_query_threads": 1,
        "codes": codes,
        "points": points,
        "raw_vector_bytes_per_item": 4 * dim,
        "run_s": time.perf_counter() - t_run,
    }
    if len(rerank_dtypes) == 1:
        result["targets"] = check_targets(result)
        if out is not None:
            json_path, png_path = write_report(out, "pq", result, plot(result), run_start=start)
            result["files"] = [str(json_path), str(png_path)]
        return result
    runs: dict[str, Any] = {}
    files: list[str] = []
    for dtype in rerank_dtypes:
        one = {
            **result,
            "codes": [c for c in codes if c["rerank_dtype"] == dtype],
            "points": [p for p in points if p["rerank_dtype"] == dtype],
        }
        one["targets"] = check_targets(one)
        if out is not None:
            json_path, png_path = write_report(out, f"pq-{dtype}", one, plot(one), run_start=start)
            files += [str(json_path), str(png_path)]
        runs[dtype] = one
    return {"runs": runs, "files": files}


def run_pq_generated(
    items: int,
    dim: int,
    *,
    part_size: int,
    pq_m: int = 16,
    rerank_dtype: str = "float16",
    ks: tuple[int, ...] = (100, 1000),
    modes: tuple[str, ...] = ("warm", "cold"),
    n_queries: int = 300,
    n_cold: int = 40,
    grid: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    out: str | Path | None = "bench-results",
    work: str | Path = "bench-results/work",
    seed: int = 0,
    query_style: str = "cluster",
    publish: str | Path | None = None,
    catalog: bool = False,
    users: int = USERS,
    train_seconds: float = 300.0,
    model: str | Path | None = None,
) -> dict[str, Any]:
    """`bench pq --set generated`: the far-off catalog made part by part by a seeded generator
    (data.synth_vectors.FarOffParts) and built part by part in `work` (index.ivfpq_resumable: a killed
    run, started again with the same options, goes on), with the re-rank rows as the only copy of the
    vectors (keep_float32=false): no vectors file is ever stored, so the files on disk are the codes,
    the re-rank rows and the tables. Ground truth is exact search over the generator's float32 vectors
    (one pass over the parts, cached in `work`). One code size and row type; writes pq-<items>.json + .png.
    `catalog` (`--set catalog`): the parts are a synthetic catalog's rows run through a model trained on it
    (embed.parts.CatalogParts: the item tower a part at a time, no vectors file either) and the queries
    held-out users' user-tower vectors, both cached in `work`; `model`: a model trained elsewhere (e.g. on
    a smaller catalog of the same world) instead of one trained on this catalog.
    `publish`: also publish the built index there as a bundle (its files hard-linked, not copied; with the
    model for `catalog`, else vectors-only), searching at the fastest warm setting that reached recall 0.95
    at the largest K, and write the queries beside it (ROOT/../queries-<items>.npy) for `bench serve
    --index ROOT --queries FILE`."""
    from towerann.bench.freshness import rss_mb
    from towerann.bench.report import begin_run, write_report
    from towerann.data.synth_vectors import FarOffParts
    from towerann.index.ivfpq_resumable import ResumableBuild

    if rerank_dtype == "float32":
        raise ConfigError("--set generated / catalog keeps no float32 copy: give --rerank-dtype float16 or int8")
    if "ram" in modes:
        raise ConfigError("--set generated / catalog measures warm and cold (its re-rank rows are not read into RAM)")
    start = begin_run()
    work = Path(work)
    predicted = _planned(items, dim, pq_m, rerank_dtype, ks, modes)  # before the run, from the committed ones
    gen: Any
    if catalog:
        gen, queries = catalog_parts(work, items, users, dim, part_size, n_queries, seed, train_seconds, model)
        described = {"kind": "synthetic catalog through a trained item tower, part by part", **gen.fingerprint()}
        described.update(users=users, queries="user tower, held-out (test) users")
        described["model"] = "trained on this catalog" if model is None else f"given: {Path(model).resolve()}"
    else:
        gen = FarOffParts(items, part_size, dim, seed=seed)
        queries = gen.queries(n_queries, seed=1, style=query_style)
        described = {"kind": "generated, part by part", **gen.params, "query_style": query_style}
    truth = generated_truth(gen, queries, max(ks), work)
    build_dir = work / f"build-{'catalog-' if catalog else ''}pq{pq_m}-{rerank_dtype}"
    _peak_rss_reset()
    t0 = time.perf_counter()
    job = ResumableBuild(gen, build_dir, {"pq_m": pq_m, "rerank_dtype": rerank_dtype, "keep_float32": False})
    resumed = bool(job.state["trained"])
    index = job.run()
    build_s, build_peak = time.perf_counter() - t0, rss_mb(os.getpid())[1]
    mem = index.memory(as_loaded=True)
    work_bytes = sum(f.stat().st_size for f in build_dir.rglob("*") if f.is_file())
    snapshot_bytes = sum(f.stat().st_size for f in (build_dir / "assembled").iterdir() if f.is_file())
    code = {
        "pq_m": pq_m,
        "rerank_dtype": rerank_dtype,
        "code_bytes": mem["codes_bytes_per_item"],
        "description": index.describe(),
        "build_s": build_s,
        "build_resumed": resumed,
        "build_peak_rss_mb": build_peak,
        "resident_bytes_per_item": mem["resident_bytes_per_item"],
        "resident_bytes_per_item_by_table": mem.get("resident_bytes_per_item_by_table"),
        "disk_bytes_per_item": mem["disk_bytes_per_item"],
        "mapped_tables_bytes_per_item": mem["mapped_tables_bytes_per_item"],
        "work_dir_bytes": work_bytes,
        "snapshot_bytes_per_item": snapshot_bytes / items,
    }
    nprobes, pools = grid or (NPROBES, POOLS)
    points = _measure({rerank_dtype: (index, None)}, queries, queries[:n_cold], truth, ks, nprobes, pools, pq_m, modes)
    result: dict[str, Any] = {
        "dataset": {
            "items": items,
            "dim": dim,
            "queries": len(queries),
            "cold_queries": min(n_cold, len(queries)),
            "source": described,
        },
        "ks": list(ks),
        "quick": False,
        "grid": {"nprobe": list(nprobes), "rerank_x_k": list(pools)},
        "single_query_threads": 1,
        "codes": [code],
        "points": points,
        "raw_vector_bytes_per_item": 4 * dim,
    }
    result["targets"] = check_targets(result)
    result["plan_before_run"] = predicted
    result["plan_vs_measured"] = _plan_vs_measured(predicted, code, points)
    if publish is not None:
        result["published"] = publish_generated(index, gen, queries, points, max(ks), Path(publish))
    if out is not None:
        json_path, png_path = write_report(out, f"pq-{items}", result, plot(result), run_start=start)
        result["files"] = [str(json_path), str(png_path)]
    return result


SERVE_RECALL = 0.95  # the published bundle searches at the fastest warm setting reaching this at the largest K


def publish_generated(
    index: Any, gen: Any, queries: np.ndarray, points: list[dict[str, Any]], k: int, root: Path
) -> dict[str, Any]:
    """Publish the built index under `root` as a bundle: with the model that made the vectors (CatalogParts:
    user_id requests run its user tower), else vectors-only (query_vector requests). The queries go to
    root/../queries-<items>.npy. Returns what was published."""
    from towerann.artifacts import save_npy_atomic
    from towerann.data.vectors_dir import VectorSet
    from towerann.freshness.publish import publish_bundle

    warm = [p for p in points if p["mode"] == "warm" and p["k"] == k]
    reached = [p for p in warm if p["recall"] >= SERVE_RECALL]
    best = min(reached, key=lambda p: p["p50_ms"]) if reached else max(warm, key=lambda p: p["recall"])
    index.search_defaults.update(best["params"])
    n = len(index)
    ids = np.arange(n, dtype=np.int64)
    categories, available = gen.attributes(ids)
    model_dir = getattr(gen, "model_dir", None)
    if model_dir is not None:
        space = gen.model.version
    else:
        space = "generated-" + hashlib.sha256(json.dumps(gen.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
    catalog = VectorSet(
        vectors=np.empty((0, gen.dim), np.float32),  # the index holds them; publishing reads none
        ids=ids,
        categories=categories.astype(np.int32),
        available=available,
        category_names=gen.category_names,
        external_ids=gen.external_ids(),
        model_version=space,
        dim=gen.dim,
        metric=gen.metric,
    )
    path = publish_bundle(root, model_dir, catalog, index=index, validation_queries=queries, calibrate_filters=False)
    queries_file = root.parent / f"queries-{n}.npy"
    save_npy_atomic(queries_file, np.ascontiguousarray(queries, np.float32))
    print(f"published {path} (search {best['params']}: warm recall@{k} {best['recall']:.4f}); queries {queries_file}")
    return {
        "root": str(root),
        "version": path.name,
        "space_id": space,
        "search": best["params"],
        "recall_at_k": best["recall"],
        "k": k,
        "reached": bool(reached),
        "queries_file": str(queries_file),
    }


def _planned(
    items: int, dim: int, pq_m: int, rerank_dtype: str, ks: tuple[int, ...], modes: tuple[str, ...]
) -> dict[str, Any]:
    """`towerann plan`'s prediction for this run (one node: this machine's RAM), per mode and K, made from
    the committed runs before this one measures anything."""
    from towerann.bench.capacity import plan

    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    out: dict[str, Any] = {}
    for mode in modes:
        for k in ks:
            p = plan(items, dim, "ivfpq", ram, k=k, pq_m=pq_m, mode=mode, rerank_dtype=rerank_dtype, keep_float32=False)
            out[f"{mode} k={k}"] = {
                key: p[key] for key in ("resident_bytes_per_item", "disk_bytes_per_item", "nodes", "per_node_latency")
            }
            out[f"{mode} k={k}"]["per_node_latency"].pop("curve", None)
    return out


def _plan_vs_measured(predicted: dict[str, Any], code: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured / predicted: bytes per item, and p50 at the setting the plan's latency came from."""
    out: dict[str, Any] = {}
    for name, p in predicted.items():
        mode, k = name.split(" k=")
        lat = p["per_node_latency"]
        at = next(
            (x for x in points if x["mode"] == mode and x["k"] == int(k) and x["params"] == lat.get("params")), None
        )
        out[name] = {
            "resident": round(code["resident_bytes_per_item"] / p["resident_bytes_per_item"], 3),
            "disk": round(code["snapshot_bytes_per_item"] / p["disk_bytes_per_item"], 3),  # every file of it
            "p50": round(at["p50_ms"] / lat["p50_ms"], 3) if at and lat.get("p50_ms") else None,
            "recall_at_planned_setting": at["recall"] if at else None,
        }
    return out


def catalog_parts(
    work: Path,
    items: int,
    users: int,
    dim: int,
    part_size: int,
    n_queries: int,
    seed: int,
    train_seconds: float,
    model: str | Path | None = None,
) -> tuple[Any, np.ndarray]:
    """`--set catalog`'s source and queries, made once and cached in `work`: a synthetic catalog, a model
    trained on it (training capped at `train_seconds`; or `model`, trained elsewhere), held-out users'
    user-tower vectors, and the catalog as CatalogParts (the item tower run a part at a time, when the
    build asks for it)."""
    from towerann.artifacts import load_npy, save_npy_atomic
    from towerann.data.dataset import validate_dataset
    from towerann.data.synth import generate
    from towerann.embed.parts import CatalogParts
    from towerann.errors import ArtifactError, DataError
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import model_version_of
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    root = work / f"catalog-{items}x{users}-d{dim}-s{seed}"
    data_dir, model_dir = root / "dataset", root / "model" if model is None else Path(model)
    try:
        validate_dataset(data_dir)
    except DataError:
        shutil.rmtree(data_dir, ignore_errors=True)
        generate(data_dir, items, users, seed=seed)
    try:
        version = model_version_of(model_dir)
    except ArtifactError:
        if model is not None:
            raise
        shutil.rmtree(model_dir, ignore_errors=True)
        cfg = TrainConfig(epochs=3, max_seconds=train_seconds, seed=seed)
        train(data_dir, model_dir, TowerConfig(dim=dim), cfg, overwrite=True, progress=False)
        version = model_version_of(model_dir)
    parts = CatalogParts(model_dir, data_dir, part_size)  # loads the model once, for the parts and the queries
    if model is not None and parts.dim != dim:  # given: checked, never trained over
        raise ConfigError(f"--model {model}: vectors of dim {parts.dim}, not --dim {dim}")
    queries_file = root / f"queries-{version}-{n_queries}.npy"
    if queries_file.exists():
        queries = load_npy(queries_file)
    else:
        queries = heldout_user_queries(parts.model, data_dir, n_queries, seed)
        save_npy_atomic(queries_file, np.ascontiguousarray(queries, np.float32))
    return parts, np.asarray(queries, np.float32)


def generated_truth(gen: Any, queries: np.ndarray, k: int, work: Path) -> np.ndarray:
    """Exact top-k ids of `queries` over the generator's float32 vectors: one pass over the parts, each
    scored against every query and merged; cached in `work` (keyed by the catalog and the queries)."""
    from towerann.artifacts import load_npy, save_npy_atomic
    from towerann.index.merge import merge_topk, padded, topk_blocked

    key = hashlib.sha256(json.dumps(gen.fingerprint()).encode() + queries.tobytes()).hexdigest()[:16]
    path = work / f"truth-{key}-k{k}.npy"
    # a deeper truth of the same catalog and queries holds this one as its first k columns (at 100M a new
    # pass is the item tower over the whole catalog again: 12 minutes)
    deeper = [(int(f.stem.rsplit("-k", 1)[1]), f) for f in work.glob(f"truth-{key}-k*.npy")]
    for depth, f in sorted(deeper):
        if depth >= k:
            cached: np.ndarray = load_npy(f, mmap=True)
            return np.ascontiguousarray(cached[:, :k])
    best = padded(len(queries), k)
    at = 0
    with threads(os.cpu_count() or 1):
        for i, count in enumerate(gen.part_counts()):
            vectors, _ = gen.part(i)
            labels = np.arange(at, at + count, dtype=np.int64)
            part = topk_blocked(queries, k, functools.partial(_scores, vectors=vectors), count, labels=labels)
            best = merge_topk([best[0], part[0]], [best[1], part[1]], k)
            at += count
    work.mkdir(parents=True, exist_ok=True)
    save_npy_atomic(path, best[0])
    return best[0]


def _scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    scores: np.ndarray = queries @ vectors.T
    return scores


def _measure(
    loaded: dict[str, tuple[Any, Any]],
    queries: np.ndarray,
    cold_q: np.ndarray,
    truth: np.ndarray,
    ks: tuple[int, ...],
    nprobes: tuple[int, ...],
    pools: tuple[int, ...],
    pq_m: int,
    modes: tuple[str, ...] = MODES,
) -> list[dict[str, Any]]:
    """The grid on one code size's snapshots ({rerank dtype: (on disk, in RAM)}): warm and in-RAM runs over
    every setting, then cold ones. The row types take turns query by query, so a shared machine's load
    weighs on each alike (their timings compare within a run)."""
    from towerann.bench.report import percentiles
    from towerann.index.tune import recall_at_k

    points = []
    for on_disk, _ in loaded.values():
        on_disk.warm_vectors()  # warm: the whole re-rank file in the page cache and mapped (cold runs come last)
    settings = [(k, {"nprobe": nprobe, "rerank": f * k}) for k in ks for nprobe in nprobes for f in pools]
    runs: list[tuple[str, int, dict[str, int]]] = [
        (mode, k, params) for k, params in settings for mode in ("warm", "ram") if mode in modes
    ]
    # Cold: only where something is re-ranked (without it nothing is read from the file: cold == warm).
    runs += [("cold", k, params) for k, params in settings if params["rerank"] and "cold" in modes]
    with threads(1):
        for mode, k, params in runs:
            qs = cold_q if mode == "cold" else queries
            found = {dt: np.full((len(qs), k), -1, np.int64) for dt in loaded}
            times = {dt: np.empty(len(qs)) for dt in loaded}
            for on_disk, in_ram in loaded.values():
                (in_ram if mode == "ram" else on_disk).search(qs[:1], k, params=params)  # warm-up: lazy allocations
            for i in range(len(qs)):
                for dt, (on_disk, in_ram) in loaded.items():
                    ix = in_ram if mode == "ram" else on_disk
                    if mode == "cold":
                        on_disk.evict_vectors()
                    t0 = time.perf_counter()
                    ids = ix.search(qs[i : i + 1], k, params=params).ids
                    times[dt][i] = time.perf_counter() - t0
                    found[dt][i] = ids.reshape(-1)[:k]
            for dt in loaded:
                lat = percentiles(times[dt])
                pt = {
                    "pq_m": pq_m,
                    "rerank_dtype": dt,
                    "mode": mode,
                    "k": k,
                    "params": params,
                    "queries": len(qs),
                    "recall": recall_at_k(found[dt], truth[: len(qs), :k]),
                    "p50_ms": lat["p50_ms"],
                    "p99_ms": lat["p99_ms"],
                }
                points.append(pt)
                log.info(
                    "pq_m=%d %s %s k=%d %s recall=%.4f p50=%.3fms",
                    pq_m,
                    dt,
                    mode,
                    k,
                    params,
                    pt["recall"],
                    pt["p50_ms"],
                )
    return points


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Per target: the fastest point that meets its recall bar, and whether it meets the rest; where
    none reaches the recall, the best recall reached (under "best_recall")."""
    by_code = {(c["pq_m"], c.get("rerank_dtype", "float32")): c for c in result["codes"]}
    out: dict[str, Any] = {}
    for name, t in TARGETS.items():
        best = None
        eligible = []
        for p in result["points"]:
            c = by_code[(p["pq_m"], p.get("rerank_dtype", "float32"))]
            if p["k"] != t["k"] or p["mode"] != t["mode"] or c["code_bytes"] != t["code_bytes"]:
                continue
            eligible.append(p)
            if p["recall"] >= t["recall"] and (best is None or p["p50_ms"] < best["p50_ms"]):
                best = {**p, "resident_bytes_per_item": c["resident_bytes_per_item"]}
        met = (
            best is not None
            and best["p50_ms"] <= t.get("p50_ms", np.inf)
            and best["resident_bytes_per_item"] <= t.get("resident", np.inf)
        )
        entry: dict[str, Any] = {"target": t, "fastest_meeting_recall": best, "met": bool(met)}
        if best is None:
            entry["best_recall"] = max(eligible, key=lambda p: p["recall"], default=None)
        out[name] = entry
    return out


def plot(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ks = result["ks"]
        fig.set_size_inches(7 * len(ks), 6)
        styles = {"warm": "-", "cold": "--", "ram": ":"}
        for j, k in enumerate(ks):
            ax = fig.add_subplot(1, len(ks), j + 1)
            for i, c in enumerate(result["codes"]):
                for mode, style in styles.items():
                    pts = frontier(
                        [
                            p
                            for p in result["points"]
                            if p["pq_m"] == c["pq_m"]
                            and p.get("rerank_dtype") == c.get("rerank_dtype")
                            and p["k"] == k
                            and p["mode"] == mode
                        ]
                    )
                    if pts:
                        ax.plot(
                            [p["p50_ms"] for p in pts],
                            [p["recall"] for p in pts],
                            style,
                            marker="o",
                            ms=3,
                            color=f"C{i}",
                            label=f"PQ{c['pq_m']} {c.get('rerank_dtype', 'float32')} {mode} "
                            f"({c['resident_bytes_per_item']:.1f} B/item resident)",
                        )
            ax.axhline(0.95, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("p50 latency, one query on 1 thread (ms)")
            ax.set_ylabel(f"recall@{k}")
            ax.set_title(
                f"ivfpq, K={k}: {result['dataset']['items']:,} items x {result['dataset']['dim']}-d "
                "(cold: vector files evicted before each query)",
                fontsize=9,
            )
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7)

    return draw


def print_table(result: dict[str, Any]) -> None:
    for one in result["runs"].values() if "runs" in result else [result]:
        print(f"{'code':<14}{'resident B/item':>16}{'disk B/item':>12}{'build s':>9}{'peak RSS MiB':>13}")
        for c in one["codes"]:
            print(
                f"{'PQ' + str(c['pq_m']) + ' ' + c['rerank_dtype']:<14}{c['resident_bytes_per_item']:>16.1f}"
                f"{c['disk_bytes_per_item']:>12.0f}{c['build_s']:>9.1f}{c['build_peak_rss_mb']:>13.0f}"
            )
        print(f"{'code':<14}{'mode':<6}{'K':>5}  {'params':<22}{'recall':>8}{'p50 ms':>9}{'p99 ms':>9}")
        for p in one["points"]:
            params = ",".join(f"{k}={v}" for k, v in p["params"].items())
            code = f"PQ{p['pq_m']} {p['rerank_dtype']}"
            print(
                f"{code:<14}{p['mode']:<6}{p['k']:>5}  {params:<22}{p['recall']:>8.4f}{p['p50_ms']:>9.3f}"
                f"{p['p99_ms']:>9.3f}"
            )
        for name, t in one["targets"].items():
            print(f"target {name}: {'met' if t['met'] else 'not met'}")


def run(args: argparse.Namespace) -> int:
    ks = parse_ks(args.k)
    try:
        pq_ms = tuple(int(x) for x in parse_csv(args.pq_m, "--pq-m"))
    except ValueError as e:
        raise ConfigError(f"--pq-m: expected comma-separated integers like 8,16,32, got {args.pq_m!r}") from e
    from towerann.index.vecfile import check_dtype  # faiss: imported when the command runs, not for --help

    dtypes = tuple(check_dtype(x) for x in parse_csv(args.rerank_dtype, "--rerank-dtype"))
    try:
        nprobes = tuple(int(x) for x in parse_csv(args.nprobes, "--nprobes")) if args.nprobes else None
        pools = tuple(int(x) for x in parse_csv(args.pools, "--pools")) if args.pools else None
    except ValueError as e:
        raise ConfigError(f"--nprobes / --pools: expected comma-separated integers ({e})") from e
    grid = None if nprobes is None and pools is None else (nprobes or NPROBES, pools or POOLS)
    bad = set(parse_csv(args.modes, "--modes")) - set(MODES)
    if bad or not args.modes:
        raise ConfigError(f"--modes: expected some of {','.join(MODES)}, got {args.modes!r}")
    work = Path(args.work) if args.work else Path(args.out) / "work"
    if bool(args.vectors) != bool(args.queries):
        raise ConfigError("--vectors and --queries go together: give both or neither")
    items, users = catalog_size(args)
    if args.set in ("generated", "catalog"):
        if len(pq_ms) != 1 or len(dtypes) != 1:
            raise ConfigError(f"--set {args.set} builds one code size and row type: give one --pq-m and --rerank-dtype")
        modes = tuple(parse_csv(args.modes, "--modes")) if args.modes != ",".join(MODES) else ("warm", "cold")
        result = run_pq_generated(
            items,
            args.dim,
            part_size=args.part_size,
            pq_m=pq_ms[0],
            rerank_dtype=dtypes[0],
            ks=ks,
            modes=modes,
            n_queries=args.queries_n,
            n_cold=args.cold_queries,
            grid=grid,
            out=args.out,
            work=work,
            seed=args.seed,
            query_style=args.query_style,
            publish=args.publish,
            catalog=args.set == "catalog",
            users=users,
            train_seconds=args.train_seconds,
            model=args.model,
        )
        print_table(result)
        print(f"wrote {' and '.join(result['files'])}")
        return 0
    if args.vectors:
        data = given_dataset(args.vectors, args.queries)
    elif args.set == "far":
        data = far_dataset(items, args.dim, n_queries=5000, seed=args.seed)
    else:
        data = synthetic_dataset(work, items, users, args.dim, train_seconds=60 if args.quick else args.train_seconds)
    work.mkdir(parents=True, exist_ok=True)
    result = run_pq_bench(
        data.vectors,
        data.queries,
        ks=ks,
        pq_ms=pq_ms,
        rerank_dtypes=dtypes,
        modes=tuple(parse_csv(args.modes, "--modes")),
        n_queries=args.queries_n,
        n_cold=args.cold_queries,
        quick=args.quick,
        grid=grid,
        out=args.out,
        work=work,
        source=data.source,
    )
    print_table(result)
    print(f"wrote {' and '.join(result['files'])}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "pq",
        help="the compressed index: resident bytes per item, recall, warm and cold latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--set",
        choices=("user", "far", "generated", "catalog"),
        default="user",
        help="user: a trained model's item vectors and held-out users' queries (default; the dataset "
        "`bench ann` caches); far: the far-off-query catalog; generated: that catalog made and built part "
        "by part, resumable in --work, no vectors file stored (100M items on one node); catalog: like user "
        "(synthetic catalog, trained model, held-out users' queries) but embedded part by part inside the "
        "resumable build, no vectors file stored",
    )
    p.add_argument(
        "--part-size",
        type=int,
        default=1_000_000,
        help="--set generated / catalog: items per part (default 1,000,000)",
    )
    p.add_argument(
        "--query-style",
        choices=("cluster", "far"),
        default="cluster",
        help="--set generated: cluster (default; the mean of 2-4 items of one cluster plus noise, near the items "
        "as a user-tower query is) or far (the mean of 3-8 random items plus noise, between clusters)",
    )
    p.add_argument(
        "--publish",
        default=None,
        metavar="ROOT",
        help="--set generated / catalog: also publish the index under ROOT as a bundle (files hard-linked; "
        "catalog: with its model, generated: vectors-only) searching at the fastest warm setting reaching "
        "recall 0.95 at the largest K, and its queries as ROOT/../queries-ITEMS.npy: what `bench serve "
        "--index ROOT --queries FILE` serves",
    )
    add_seed(p, "--set far: catalog seed")
    add_catalog(p, ITEMS, users=USERS, quick=(QUICK_ITEMS, QUICK_USERS), trained=True)
    p.add_argument("--train-seconds", type=float, default=300.0, help="cap on model training time (default 300)")
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="--set catalog: embed with this trained model (e.g. one trained on a smaller catalog of the same "
        "world: at 100M items training would score the whole catalog) instead of training one on the catalog",
    )
    add_given_vectors(p)
    add_ks(p)
    p.add_argument("--pq-m", default="8,16,32", help="PQ code sizes in bytes per item (default 8,16,32)")
    p.add_argument(
        "--rerank-dtype",
        default="float32",
        help="re-rank row types, comma-separated, of float32, float16, int8 (default float32; several: one "
        "build per code size, a snapshot and a pq-<dtype>.json per type)",
    )
    p.add_argument("--queries-n", type=int, default=300, help="warm queries measured per setting (default 300)")
    p.add_argument(
        "--cold-queries",
        type=int,
        default=40,
        help="cold queries per setting, each after evicting the vector file (default 40)",
    )
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="modes to measure (default warm,cold,ram; ram reads the re-rank rows into the process: at 10M x "
        "128-d float32, 5 GB more)",
    )
    p.add_argument("--nprobes", default=None, help=f"nprobe values of the grid (default {','.join(map(str, NPROBES))})")
    p.add_argument(
        "--pools",
        default=None,
        help=f"re-rank depths of the grid, in multiples of K (default {','.join(map(str, POOLS))}; 0: no re-rank)",
    )
    add_quick(p)
    add_out(p, "pq.json and pq.png")
    p.add_argument("--work", default=None, help="cache for the dataset and the snapshots (default OUT/work)")
    p.set_defaults(func=run)

"""`towerann bench shards`: a sharded index (towerann.cluster) at S = 1, 2, 4, ... shards on a local
Ray cluster of several nodes on this machine, beside the unsharded index of the same items.

On a seeded far-off catalog (towerann.data.synth_vectors) it builds the unsharded index and, for each S,
a ShardedIndex of S shards of the same backend and build parameters, searched at the same
per-shard search parameters. Recall@K is against exact search, at each of the backend's settings
in RECALL_SETTINGS (the last one is the timed one). Then the sharded snapshot is
published and served by one Ray actor per shard, and one query at a time (the serving path) is
timed: through plain actor calls (one call per shard), through a compiled graph (ray.dag) of the
same calls, and a batch of queries per call (per query). Also timed: the bare S-way fan-out of
calls that do nothing (plain and compiled) and the merge alone (merge_topk of S lists).
"Overhead" is the sharded p50 through Ray minus the unsharded index's p50 in this process.

The JSON's "targets" checks each S against TARGET (at 1M items): recall within 0.5 points of the
unsharded index, and the fan-out + merge overhead at S=4 under 2 ms p50. Writes shards-<items>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.ann import threads
from towerann.bench.options import add_catalog, add_k, add_out, add_seed, parse_csv
from towerann.bench.report import percentiles, write_report
from towerann.errors import ConfigError
from towerann.index import create
from towerann.index.merge import merge_topk
from towerann.index.snapshot import publish
from towerann.index.tune import recall_at_k

log = logging.getLogger(__name__)

BUILD: dict[str, dict[str, Any]] = {"hnsw": {"M": 16, "ef_construction": 80}, "exact": {}, "ivfpq": {}, "scann": {}}
# recall is compared at each setting; the last is the one timed (ef=1200: recall@100 ~0.94 on this
# catalog in docs/bench/ann-far-200k.json, M=32)
RECALL_SETTINGS: dict[str, list[dict[str, Any]]] = {
    "hnsw": [{"ef": 128}, {"ef": 512}, {"ef": 1200}],
    "exact": [{}],
    "ivfpq": [{}],
    "scann": [{}],
}
TARGET = {"recall_points": 0.5, "overhead_p50_ms_at_4": 2.0}
BATCH = 32
COMPILED_TIMEOUT_S = 60


def _time_each(fn: Callable[[int], Any], n: int, warm: int = 10) -> dict[str, float]:
    for i in range(min(warm, n)):
        fn(i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    return {k: round(v, 4) for k, v in percentiles(samples).items()}


def _one_by_one(index: Any, queries: np.ndarray, k: int, params: dict[str, Any] | None) -> Callable[[int], Any]:
    """fn(i): a search of the i-th query (round robin) alone, as the serving path sends them."""
    return lambda i: index.search(queries[i % len(queries)], k, params=params)


def _compiled(actors: list[Any], method: str, *bound: Any) -> Any:
    """A compiled graph (ray.dag) calling `method(*bound, input)` on every actor at once."""
    from ray.dag import DAGContext, InputNode, MultiOutputNode

    # a compiled graph's first executions set up its channels: seconds on a loaded machine, past the
    # default 10 s read timeout
    DAGContext.get_current().get_timeout = COMPILED_TIMEOUT_S
    with InputNode() as inp:
        dag = MultiOutputNode([getattr(a, method).bind(*bound, inp) for a in actors])
    return dag.experimental_compile()


def measure_ray(
    ix: Any, queries: np.ndarray, k: int, params: dict[str, Any], n_time: int, compiled: bool = True
) -> dict[str, Any]:
    """Ray paths of one attached ShardedIndex (see the module docstring); compiled=False skips the
    compiled graphs (each takes seconds to compile and tear down)."""
    import ray

    shards = ix.shards
    s, q1 = shards.n, queries[:1]
    out: dict[str, Any] = {
        "noop_plain": _time_each(lambda i: ray.get([a.noop.remote(q1) for a in shards.actors]), n_time),
        "search_plain": _time_each(_one_by_one(ix, queries, k, params), n_time),
        "batch_plain_per_query": {},
    }
    t = _time_each(lambda i: ix.search(queries[:BATCH], k, params=params), max(n_time // 10, 5), warm=2)
    out["batch_plain_per_query"] = {key: round(v / BATCH, 4) for key, v in t.items() if key.endswith("_ms")}
    p = {**ix.search_defaults, **params}
    for name in ("noop_compiled", "search_compiled") if compiled else ():
        graph = (
            _compiled(shards.actors, "noop")
            if name == "noop_compiled"
            else _compiled(shards.actors, "call", shards.version, "search")
        )
        try:
            if name == "noop_compiled":

                def noop(i: int, graph: Any = graph) -> Any:
                    return ray.get(graph.execute(q1))

                out[name] = _time_each(noop, n_time)
            else:

                def one(i: int, graph: Any = graph) -> Any:
                    parts = [r for _, r in ray.get(graph.execute((queries[i % len(queries)][None, :], k, None, p)))]
                    return merge_topk([r.ids for r in parts], [r.scores for r in parts], k)

                out[name] = _time_each(one, n_time)
        except ray.exceptions.RayError as e:  # a compiled graph's channel read timed out (10 s) under load
            log.warning("%s failed: %s", name, str(e).splitlines()[0][:200])
            out[name] = {"error": str(e).splitlines()[0][:200]}
        finally:
            graph.teardown()
    lists = [
        (
            np.arange(k, dtype=np.int64)[None, :] + j * k,
            np.sort(np.random.default_rng(j).random((1, k)))[:, ::-1].astype(np.float32),
        )
        for j in range(s)
    ]
    out["merge"] = _time_each(lambda i: merge_topk([a for a, _ in lists], [b for _, b in lists], k), n_time)
    out["shard_nodes"] = len({i["node"] for i in shards.info()})
    return out


def run_shards_bench(
    n_items: int,
    *,
    dim: int = 128,
    k: int = 100,
    shard_counts: tuple[int, ...] = (1, 2, 4),
    backend: str = "hnsw",
    nodes: int = 2,
    n_queries: int = 200,
    n_time: int = 200,
    seed: int = 0,
    out: str | Path | None = None,
    address: str | None = None,
    compiled: bool = True,
) -> dict[str, Any]:
    from towerann.cluster.local_cluster import LocalCluster
    from towerann.cluster.ray_shards import RayShards, attach, require_ray
    from towerann.data.synth_vectors import far_off_catalog
    from towerann.index.sharded import ShardedIndex

    ray = require_ray()
    cat = far_off_catalog(n_items, n_queries, dim, seed=seed)
    q = cat.queries
    build, settings = BUILD.get(backend, {}), RECALL_SETTINGS.get(backend, [{}])
    search = settings[-1]

    def recalls(index: Any) -> dict[str, float]:
        return {
            json.dumps(p, sort_keys=True): round(recall_at_k(index.search(q, k, params=p or None).ids, gt), 4)
            for p in settings
        }

    result: dict[str, Any] = {
        "params": {
            "items": n_items,
            "dim": dim,
            "k": k,
            "shards": list(shard_counts),
            "backend": backend,
            "build_params": build,
            "search_params": search,
            "recall_settings": settings,
            "nodes": nodes,
            "queries": n_queries,
            "timed_queries": n_time,
            "batch": BATCH,
            "seed": seed,
        },
        "dataset": {"kind": "far-off synthetic (towerann.data.synth_vectors)", **cat.params},
        "points": [],
    }
    with threads(2):
        t0 = time.perf_counter()
        truth = create("exact", dim)
        truth.build(cat.vectors, np.arange(n_items))
        gt = truth.search(q, k).ids
        del truth
        plain = create(backend, dim, **build)
        plain.build(cat.vectors, np.arange(n_items))
        build_s = time.perf_counter() - t0
    with threads(1):
        base: dict[str, Any] = {
            "recall": round(recall_at_k(plain.search(q, k, params=search or None).ids, gt), 4),
            "recall_by_setting": recalls(plain),
            "local": _time_each(_one_by_one(plain, q, k, search or None), n_time),
            "build_s": round(build_s, 1),
        }
    del plain  # freed before the shards load their copies
    result["unsharded"] = base
    connected = ray.is_initialized()  # a caller's cluster (a test's): use it, leave it running
    cluster = None if address or connected else LocalCluster(nodes=nodes)
    try:
        if cluster is not None:
            address = cluster.start()
        if not connected:
            ray.init(address=address, namespace="towerann-bench", log_to_driver=False, logging_level="ERROR")
        if cluster is not None:
            cluster.wait_for_nodes()
        for s in shard_counts:
            with threads(2):
                t0 = time.perf_counter()
                sharded = ShardedIndex(dim, shards=s, backend=backend, **build)
                sharded.build(cat.vectors, np.arange(n_items))
                built = time.perf_counter() - t0
            with threads(1):
                recall = recall_at_k(sharded.search(q, k, params=search or None).ids, gt)
                by_setting = recalls(sharded)
                local = _time_each(_one_by_one(sharded, q, k, search or None), n_time)
            with tempfile.TemporaryDirectory(prefix="bench-shards-") as root:
                publish(sharded, root, "bench")
                del sharded  # the shard actors load their own copies
                ix = attach(root, name=f"bench-{s}")
                try:
                    ray_recall = recall_at_k(ix.search(q, k, params=search).ids, gt)
                    timings = measure_ray(ix, q, k, search, n_time, compiled)
                finally:
                    shards = ix.shards
                    assert isinstance(shards, RayShards)  # attach() serves the shards by Ray actors
                    shards.close()
            point = {
                "shards": s,
                "recall": round(recall, 4),
                "ray_recall": round(ray_recall, 4),
                "recall_by_setting": by_setting,
                "recall_points_by_setting": {
                    key: round(100 * (r - base["recall_by_setting"][key]), 2) for key, r in by_setting.items()
                },
                "recall_points_vs_unsharded": round(100 * (recall - base["recall"]), 2),
                "build_s": round(built, 1),
                "local_in_process": local,
                **timings,
                "overhead_p50_ms": round(timings["search_plain"]["p50_ms"] - base["local"]["p50_ms"], 4),
                "overhead_compiled_p50_ms": round(timings["search_compiled"]["p50_ms"] - base["local"]["p50_ms"], 4)
                if "p50_ms" in timings.get("search_compiled", {})
                else None,
            }
            result["points"].append(point)
            log.info("S=%d: recall %.4f, Ray p50 %.3f ms", s, recall, timings["search_plain"]["p50_ms"])
    finally:
        if cluster is not None:
            cluster.stop()
        elif not connected and ray.is_initialized():
            ray.shutdown()
    result["targets"] = [
        {
            "shards": p["shards"],
            "recall_ok": abs(p["recall_points_vs_unsharded"]) <= TARGET["recall_points"]
            or p["recall_points_vs_unsharded"] > 0,
            "overhead_ok": p["overhead_p50_ms"] < TARGET["overhead_p50_ms_at_4"],
        }
        for p in result["points"]
    ]
    if out is not None:
        files = write_report(out, f"shards-{n_items}", result, plot(result))
        result["files"] = [str(f) for f in files if f is not None]
    return result


def plot(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        pts = result["points"]
        xs = [p["shards"] for p in pts]
        left, right = fig.subplots(1, 2)
        base = result["unsharded"]["local"]["p50_ms"]
        for key, label in (
            ("search_plain", "search, actor calls"),
            ("search_compiled", "search, compiled graph"),
            ("local_in_process", "search, shards in-process"),
            ("noop_plain", "no-op fan-out, calls"),
            ("noop_compiled", "no-op fan-out, compiled"),
            ("merge", "merge_topk alone"),
        ):
            if key not in pts[0]:
                continue
            left.plot(xs, [p[key].get("p50_ms", np.nan) for p in pts], marker="o", label=label)
        left.plot(
            xs,
            [p["batch_plain_per_query"]["p50_ms"] for p in pts],
            marker="s",
            linestyle="--",
            label=f"search, {BATCH} queries a call (per query)",
        )
        left.axhline(base, color="grey", linewidth=0.8, label="unsharded index, in-process")
        left.set_xlabel("shards")
        left.set_ylabel(f"p50 ms, one query, k={result['params']['k']}")
        left.set_yscale("log")
        left.set_xticks(xs)
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=6)
        right.plot(xs, [p["recall"] for p in pts], marker="o", label="sharded")
        right.axhline(result["unsharded"]["recall"], color="grey", linewidth=0.8, label="unsharded")
        right.set_xlabel("shards")
        right.set_ylabel(f"recall@{result['params']['k']}")
        right.set_xticks(xs)
        right.grid(True, alpha=0.3)
        right.legend(fontsize=7)
        pr = result["params"]
        fig.suptitle(f"sharded {pr['backend']}, {pr['items']:,} items x {pr['dim']}-d, {pr['nodes']} local Ray nodes")

    return draw


def print_table(result: dict[str, Any]) -> None:
    u = result["unsharded"]
    print(
        f"unsharded {result['params']['backend']}: recall {u['recall']:.4f}, p50 {u['local']['p50_ms']:.3f} ms "
        f"p99 {u['local']['p99_ms']:.3f} ms (in-process, one thread)"
    )
    print(
        f"{'S':>3}{'recall':>8}{'d pts':>7}{'local':>8}{'ray p50':>9}{'ray p99':>9}{'compiled':>9}{'batch/q':>9}"
        f"{'noop':>8}{'noop cg':>8}{'merge':>8}{'overhead':>9}"
    )
    for p in result["points"]:
        print(
            f"{p['shards']:>3}{p['recall']:>8.4f}{p['recall_points_vs_unsharded']:>7.2f}"
            f"{p['local_in_process']['p50_ms']:>8.3f}{p['search_plain']['p50_ms']:>9.3f}"
            f"{p['search_plain']['p99_ms']:>9.3f}{p.get('search_compiled', {}).get('p50_ms', np.nan):>9.3f}"
            f"{p['batch_plain_per_query']['p50_ms']:>9.3f}{p['noop_plain']['p50_ms']:>8.3f}"
            f"{p.get('noop_compiled', {}).get('p50_ms', np.nan):>8.3f}{p['merge']['p50_ms']:>8.3f}"
            f"{p['overhead_p50_ms']:>9.3f}"
        )
    print("(ms, p50 unless named; overhead = Ray p50 - the unsharded p50)")
    print(
        f"recall@{result['params']['k']} per search setting: unsharded, then S = "
        f"{', '.join(str(p['shards']) for p in result['points'])}"
    )
    for key, r in u["recall_by_setting"].items():
        print(f"  {key:<16}{r:.4f}  " + "  ".join(f"{p['recall_by_setting'][key]:.4f}" for p in result["points"]))


def run(args: argparse.Namespace) -> int:
    counts = tuple(int(s) for s in parse_csv(args.shards, "--shards"))
    if not counts or min(counts) < 1:
        raise ConfigError(f"--shards: positive shard counts, got {args.shards!r}")
    result = run_shards_bench(
        args.items,
        dim=args.dim,
        k=args.k,
        shard_counts=counts,
        backend=args.backend,
        nodes=args.nodes,
        n_queries=args.queries_n,
        n_time=args.time_n,
        seed=args.seed,
        out=args.out,
        address=args.address,
        compiled=not args.no_compiled,
    )
    print_table(result)
    print(f"wrote {' and '.join(result['files'])}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "shards",
        help="a sharded index on a local Ray cluster: recall vs unsharded, fan-out + merge overhead per shard count",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 200_000)
    add_k(p, 100, "K")
    p.add_argument("--shards", default="1,2,4", help="comma-separated shard counts (default 1,2,4)")
    p.add_argument("--backend", default="hnsw", choices=sorted(BUILD), help="the shards' backend (default hnsw)")
    p.add_argument("--nodes", type=int, default=2, help="local Ray nodes to start (default 2)")
    p.add_argument("--address", default=None, help="use a running Ray cluster at this address instead")
    p.add_argument("--queries-n", type=int, default=200, help="queries for recall (default 200)")
    p.add_argument("--time-n", type=int, default=200, help="timed one at a time per path (default 200)")
    add_seed(p, "catalog seed")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled-graph (ray.dag) paths")
    add_out(p, "shards-<items>.json and .png")
    p.set_defaults(func=run)

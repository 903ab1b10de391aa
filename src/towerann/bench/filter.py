"""`towerann bench filter`: recall and latency of filtered search against the share of the catalog a filter keeps.

On a seeded clustered catalog (towerann.data.synth_vectors.far_off_catalog; an item's category is its
cluster, so a filter keeps items that sit together, as real category filters do) each backend is
built once per K the way `towerann index build --kind KIND --k K --recall R --queries` builds it
(index.build.build_index: tuned unfiltered to --recall, then its filter plan calibrated, both on half
of the queries) and searched with the settings that build left. On the other half, for each share of the catalog (whole
categories in a seeded random order until the share is reached; 100% = no filter) it measures
recall@K against exact filtered search (`Index.exact_search`) and p50/p99 of one query at a time on
one thread, for the planner and for each single path (exact, filtered, post: index.filter_plan).
With --partition-by category, hnsw is built with a sub-index per category of at least
--partition-min items (index.partition) and the "partition" path is measured too; the JSON
records what the partitions cost in memory (bytes per item). --filter-order largest measures
filters made of the biggest categories first (a few big values: what partitions are for) instead
of a random order (mostly small categories, which the partition path scans like the exact one).

What to look for (`targets` in the JSON): recall@K >= 0.95 at every share, the planner's filtered p99
at most 2x the unfiltered p99 of the same index, and its p50 at most 2x the unfiltered p50 at the
mid-range shares (10% and 30% kept), where brute force is slowest against an ANN walk. Writes
filter-<items>.json and .png.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.ann import threads
from towerann.bench.options import add_backends, add_catalog, add_ks, add_out, add_recall, add_seed, parse_csv, parse_ks
from towerann.bench.report import percentiles, write_report
from towerann.errors import BackendUnavailable, ConfigError
from towerann.index import Filter, filter_plan
from towerann.index.build import Tuning, build_index
from towerann.index.tune import recall_at_k
from towerann.index.value_partitions import DEFAULT_MIN_ITEMS

log = logging.getLogger(__name__)

SHARES = (0.001, 0.005, 0.02, 0.05, 0.1, 0.3, 1.0)
BACKENDS = ("exact", "hnsw", "ivfpq", "scann")
TARGET = {"recall": 0.95, "p99_vs_unfiltered": 2.0, "p50_vs_unfiltered": 2.0}
MID_SHARES = (0.1, 0.3)  # the shares the p50 bound is checked at


def share_filter(clusters: np.ndarray, share: float, rng: np.random.Generator, order: str = "random") -> Filter | None:
    """Whole categories in a random order (order="largest": biggest first, the few-big-values filters
    partitions are for) until about `share` of the items are kept (None: 100%)."""
    if share >= 1.0:
        return None
    if order == "largest":
        codes, counts = np.unique(clusters, return_counts=True)
        chosen, total = [], 0
        for i in np.argsort(-counts, kind="stable"):
            if total >= 0.9 * share * len(clusters):
                break
            if total + counts[i] <= 1.2 * share * len(clusters):
                chosen.append(int(codes[i]))
                total += int(counts[i])
    else:
        chosen, _ = filter_plan.categories_for_share(clusters, share, rng)
    if not chosen:  # every category is bigger than the share: the smallest one
        codes, counts = np.unique(clusters, return_counts=True)
        chosen = [int(codes[np.argmin(counts)])]
    return Filter(categories=frozenset(chosen))


def _searcher(index: Any, k: int, flt: Filter | None, params: dict[str, Any]) -> Callable[[np.ndarray], Any]:
    """One query path of `index`: its filtered search at K with these params."""
    return lambda q: index.search(q, k, filter=flt, params=params or None)


def measure_backend(
    kind: str,
    vectors: np.ndarray,
    clusters: np.ndarray,
    q_cal: np.ndarray,
    q_eval: np.ndarray,
    ks: tuple[int, ...],
    shares: tuple[float, ...],
    recall: float,
    n_time: int,
    seed: int,
    build_params: dict[str, Any] | None = None,
    filter_order: str = "random",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per K, build one backend as `towerann index build --kind KIND --k K --recall R --queries` does
    (index.build.build_index: tuned unfiltered, then its filter plan measured on the same queries) and
    measure every (share, path) with the search settings that build left on the index."""
    info: dict[str, Any] = {"build_s": {}, "tuned": {}, "calibration_s": 0.0, "plan": []}
    rng = np.random.default_rng(seed)
    filters = [(share, share_filter(clusters, share, rng, filter_order)) for share in shares]
    points: list[dict[str, Any]] = []
    for k in ks:
        t0 = time.perf_counter()
        index = build_index(
            vectors, np.arange(len(vectors)), clusters, kind=kind, params=build_params, tuning=Tuning(q_cal, k, recall)
        )
        info["build_s"][str(k)] = round(time.perf_counter() - t0, 1)
        info["describe"] = index.describe()
        partitions = getattr(index, "partition_info", lambda: None)()
        if partitions is not None:
            info["partitions"] = partitions
        info["tuned"][str(k)] = {key: v for key, v in index.search_defaults.items() if key != "filter_plan"}
        cal = getattr(index, "filter_calibration", None)
        if cal is not None:  # brute force has no plan
            info["calibration_s"] += cal["seconds"]
            info.setdefault("calibration", {})[str(k)] = cal["points"]
            info["plan"] += index.search_defaults.get("filter_plan") or []
        points += _measure_shares(index, kind, k, clusters, q_eval, filters, n_time)
        del index
    return info, points


def _measure_shares(
    index: Any,
    kind: str,
    k: int,
    clusters: np.ndarray,
    q_eval: np.ndarray,
    filters: list[tuple[float, Filter | None]],
    n_time: int,
) -> list[dict[str, Any]]:
    """Recall and one-query latency of the planner and of each single path, per share kept."""
    points = []
    for share, flt in filters:
        kept = len(clusters) if flt is None else int(np.isin(clusters, list(flt.categories or ())).sum())
        truth = index.exact_search(q_eval, k, filter=flt).ids
        chosen = filter_plan.choose(kept, len(clusters), k, index.search_defaults) if flt else "unfiltered"
        paths = ("planner",) if flt is None else ("planner", *index.filter_paths)
        runs = {path: _searcher(index, k, flt, {} if path == "planner" else {"filter_path": path}) for path in paths}
        times = filter_plan.time_paths(runs, q_eval[:n_time])  # the paths take turns on each query
        for path, search in runs.items():
            res = search(q_eval)
            lat = percentiles(times[path] / 1e3)
            points.append(
                {
                    "kind": kind,
                    "k": k,
                    "share": share,
                    "kept": kept,
                    "path": path,
                    "planner_chose": chosen if path == "planner" else None,
                    "recall": round(recall_at_k(res.ids, truth), 4),
                    "exact_rows": round(res.exact_rows / len(q_eval), 3),
                    "p50_ms": round(lat["p50_ms"], 4),
                    "p99_ms": round(lat["p99_ms"], 4),
                }
            )
            log.info("bench filter: %s", points[-1])
    return points


def check_targets(points: list[dict[str, Any]], target: dict[str, float] = TARGET) -> list[dict[str, Any]]:
    """Per (kind, K, share): does the planner meet the recall floor, the p99 bound and (at MID_SHARES) the
    p50 bound, each against the unfiltered search of the same index?"""
    unfiltered = {(p["kind"], p["k"]): p for p in points if p["share"] >= 1.0}
    out = []
    for p in points:
        if p["path"] != "planner":
            continue
        base = unfiltered[(p["kind"], p["k"])]
        bound = target["p99_vs_unfiltered"] * base["p99_ms"]
        row = {
            "kind": p["kind"],
            "k": p["k"],
            "share": p["share"],
            "recall_ok": p["recall"] >= target["recall"],
            "p99_ok": p["p99_ms"] <= bound,
            "p99_bound_ms": round(bound, 4),
        }
        if p["share"] in MID_SHARES:
            row["p50_bound_ms"] = round(target["p50_vs_unfiltered"] * base["p50_ms"], 4)
            row["p50_ok"] = p["p50_ms"] <= row["p50_bound_ms"]
        out.append(row)
    return out


def run_filter_bench(
    n_items: int,
    *,
    dim: int = 128,
    ks: tuple[int, ...] = (100, 1000),
    backends: tuple[str, ...] = BACKENDS,
    shares: tuple[float, ...] = SHARES,
    recall: float = 0.95,
    n_queries: int = 400,
    n_time: int = 200,
    seed: int = 0,
    out: str | Path | None = None,
    partition_by: str | None = None,
    partition_min: int = DEFAULT_MIN_ITEMS,
    filter_order: str = "random",
) -> dict[str, Any]:
    from towerann.data.synth_vectors import far_off_catalog

    cat = far_off_catalog(n_items, n_queries, dim, seed=seed)
    half = n_queries // 2
    q_cal, q_eval = cat.queries[:half], cat.queries[half:]
    result: dict[str, Any] = {
        "params": {
            "items": n_items,
            "dim": dim,
            "ks": list(ks),
            "shares": list(shares),
            "recall_target": recall,
            "queries": len(q_eval),
            "timed_queries": min(n_time, len(q_eval)),
            "seed": seed,
            "threads": 1,
            "categories": int(len(np.unique(cat.clusters))),
            "partition_by": partition_by,
            "partition_min": partition_min if partition_by else None,
            "filter_order": filter_order,
        },
        "dataset": {"kind": "far-off synthetic (towerann.data.synth_vectors)", **cat.params},
        "backends": {},
        "points": [],
        "skipped": {},
    }
    with threads(1):
        for kind in backends:
            try:
                build = (
                    {"partition_by": partition_by, "partition_min": partition_min}
                    if kind == "hnsw" and partition_by
                    else {}
                )
                info, points = measure_backend(
                    kind,
                    cat.vectors,
                    cat.clusters,
                    q_cal,
                    q_eval,
                    ks,
                    shares,
                    recall,
                    n_time,
                    seed,
                    build,
                    filter_order,
                )
            except BackendUnavailable as e:
                result["skipped"][kind] = str(e)
                continue
            result["backends"][kind] = info
            result["points"] += points
    result["targets"] = check_targets(result["points"])
    if out is not None:
        name = (
            f"filter-{n_items}"
            + (f"-partitions-{partition_by}" if partition_by else "")
            + ("-largest" if filter_order == "largest" else "")
        )
        files = write_report(out, name, result, plot(result))
        result["files"] = [str(f) for f in files if f is not None]
    return result


STYLE = {"planner": "-", "exact": ":", "filtered": "--", "post": "-.", "partition": (0, (1, 1, 3, 1))}


def plot(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ks = result["params"]["ks"]
        kinds = list(result["backends"])
        colours = {kind: f"C{i}" for i, kind in enumerate(kinds)}
        axes = fig.subplots(2, len(ks), squeeze=False)
        for col, k in enumerate(ks):
            for row, metric in enumerate(("recall", "p99_ms")):
                ax = axes[row][col]
                for kind in kinds:
                    for path, style in STYLE.items():
                        pts = sorted(
                            (
                                p
                                for p in result["points"]
                                if p["kind"] == kind
                                and p["k"] == k
                                and (
                                    p["path"] == path
                                    or (p["share"] >= 1.0 and path != "planner" and p["path"] == "planner")
                                )
                            ),
                            key=lambda p: p["share"],
                        )
                        if len(pts) < 2:
                            continue
                        ax.plot(
                            [100 * p["share"] for p in pts],
                            [p[metric] for p in pts],
                            linestyle=style,
                            color=colours[kind],
                            marker="o" if path == "planner" else None,
                            markersize=3,
                            linewidth=2 if path == "planner" else 1,
                            label=f"{kind} {path}" if col == 0 and row == 0 else None,
                        )
                ax.set_xscale("log")
                if metric == "p99_ms":
                    ax.set_yscale("log")
                else:
                    ax.axhline(result["params"]["recall_target"], color="grey", linewidth=0.8)
                ax.set_xlabel("share of the catalog the filter keeps (%)")
                ax.set_ylabel(f"recall@{k}" if metric == "recall" else f"p99 ms, k={k} (one query, one thread)")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(loc="lower left", ncol=2, fontsize=6)  # inside an axes: tight_layout keeps it clear
        fig.suptitle(f"filtered search, {result['params']['items']:,} items: planner (solid) and single paths")

    return draw


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'backend':<8}{'K':>6}{'share':>8}  {'path':<10}{'chose':<11}{'recall':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'exact rows':>11}"
    )
    for p in result["points"]:
        print(
            f"{p['kind']:<8}{p['k']:>6}{p['share']:>8.1%}  {p['path']:<10}{p['planner_chose'] or '':<11}"
            f"{p['recall']:>8.4f}{p['p50_ms']:>9.3f}{p['p99_ms']:>9.3f}{p['exact_rows']:>11.2f}"
        )
    for kind, info in result["backends"].items():
        part = info.get("partitions")
        if part:
            mem = part["memory"]
            print(
                f"{kind} partitions by {part['by']} (>= {part['min_items']} items): {mem['partitions']} partitions, "
                f"{mem['items']} items, {mem['bytes_per_item']:.0f} bytes per catalog item "
                f"({mem['bytes_per_partitioned_item']:.0f} per partitioned item); plan {info['plan']}"
            )
    for kind, why in result["skipped"].items():
        print(f"skipped {kind}: {why}")


def run(args: argparse.Namespace) -> int:
    shares = tuple(float(s) for s in parse_csv(args.shares, "--shares"))
    if not all(0 < s <= 1 for s in shares):
        raise ConfigError(f"--shares: each share must be in (0, 1], got {args.shares!r}")
    result = run_filter_bench(
        args.items,
        dim=args.dim,
        ks=parse_ks(args.k),
        backends=parse_csv(args.backends, "--backends"),
        shares=shares,
        recall=args.recall,
        n_queries=2 * args.queries_n,
        n_time=args.time_n,
        seed=args.seed,
        out=args.out,
        partition_by=args.partition_by,
        partition_min=args.partition_min,
        filter_order=args.filter_order,
    )
    print_table(result)
    print(f"wrote {' and '.join(result['files'])}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "filter",
        help="filtered search: recall and p50/p99 against the share of the catalog kept, planner and each path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 1_000_000)
    add_ks(p)
    p.add_argument(
        "--shares",
        default=",".join(str(s) for s in SHARES),
        help=f"shares of the catalog kept (default {','.join(str(s) for s in SHARES)}; 1 = no filter)",
    )
    add_backends(p, BACKENDS)
    add_recall(p, "tuning and planner recall target")
    p.add_argument("--queries-n", type=int, default=200, help="queries measured (as many again calibrate; default 200)")
    p.add_argument("--time-n", type=int, default=200, help="of those, timed one at a time (default 200)")
    add_seed(p, "catalog and filter seed")
    p.add_argument(
        "--partition-by",
        default=None,
        choices=["category"],
        help="build hnsw with a sub-index per category (index.partition) and measure the partition path",
    )
    p.add_argument(
        "--partition-min",
        type=int,
        default=DEFAULT_MIN_ITEMS,
        help=f"a category gets a partition from this many items (default {DEFAULT_MIN_ITEMS})",
    )
    p.add_argument(
        "--filter-order",
        default="random",
        choices=["random", "largest"],
        help="measured filters: whole categories in a seeded random order (default), or biggest first",
    )
    add_out(p, "filter-<items>[-partitions-category].json and .png")
    p.set_defaults(func=run)

"""The filter planner: which path one masked search takes, from the mask's exact count and a measured table.

The rule a search applies (`choose`) and the table's format (`check_table`) live in
`towerann.index.path_choice`, below the slot base class; they are re-exported here. This module
measures the table (`calibrate`) by searching an index along each path.

Four paths (a backend lists the ones it has in `Index.filter_paths`):
  exact     brute force over the qualifying items: exact, its cost grows with their count
  filtered  the library's own filtered search, widened as the mask narrows (HNSW: a bitmap
            selector in the graph walk, beam widened up to 4x; IVF-PQ: selector, more probes;
            ScaNN: more leaves, over-fetch)
  post      over-fetch + post-filter (HNSW: an unbounded beam, masked slots dropped after; ScaNN:
            over-fetch at the unfiltered leaf count)
  partition only the sub-indexes of the filter's values (index.value_partitions; HNSW built with
            partition_by), merged by score; brute force over values without a partition

The table (search param `filter_plan`, measured by `calibrate` and stored with the index in its
search defaults) is a list of rows [k, max_share, path]: for a query at k (the nearest calibrated
k at or above it, else the largest) the first row whose max_share is at least the mask's share of
the slots gives the path. With no table, today's constants decide: exact at most `exact_below`
(16,384) qualifying items, else the backend's own choice (HNSW: post-filter from 25% up).
A query whose mask keeps at most k items always goes exact. A mask with no filter (removed or hidden
items only) keeping at least path_choice.HIDDEN_ONLY_SHARE of the slots takes the unfiltered search
with those slots dropped ("post", or "filtered" where a backend has no post path), not the plan.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from towerann.errors import ConfigError
from towerann.index.base import Mask, SlotIndex
from towerann.index.path_choice import PATHS as PATHS
from towerann.index.path_choice import check_path as check_path
from towerann.index.path_choice import check_table as check_table
from towerann.index.path_choice import choose as choose
from towerann.index.protocol import Index, as_vectors
from towerann.index.recall import recall_at_k
from towerann.index.recall import recall_standard_error as recall_standard_error
from towerann.index.tune import single_threaded

log = logging.getLogger(__name__)

# Shares of the catalog a calibration measures (the plan's rows sit between them, geometrically).
# 0.95 stands for an unfiltered search with a few hidden items (any hidden item makes a mask): measured
# at 0.6 alone, the top row once said exact for IVF-PQ at k=1000, a brute force over the whole catalog.
SHARES = (0.001, 0.005, 0.02, 0.05, 0.1, 0.3, 0.6, 0.95)
CALIBRATION_QUERIES = 40  # timed one at a time per (share, path); all of them for recall
# Masks drawn per share for recall (a path's recall at a share is its worst over them; its timing is on the
# first): categories follow the vectors' clusters, so which categories a mask holds moves a graph walk's
# recall far more than its share does - at 6,000 items, HNSW's filtered path measured 0.969 on one draw
# of 60% of the catalog and 0.785 on another of 56%.
MASK_DRAWS = 3
EXACT_MARGIN = 0.8  # a library path replaces exact search only when its p50 is below 0.8x exact's
RECALL_SLACK = 0.01  # the recall floor of a path: the target, or the index's unfiltered recall less this
# A path misses the floor only when its measured recall is this many standard errors (over the
# calibration queries) below it: at 1M items, an HNSW tuned to 0.9 measured 0.869 on a mask of 95% of the
# catalog against a floor of 0.87, and every availability-masked request went brute force (40 ms, not 0.4).
RECALL_SE_TOLERANCE = 2.0
# A partition's graph is a fraction of the whole one, so its beam can be narrower for the same recall:
# calibration keeps the smallest of these scales of ef (search param partition_ef_scale) at which a
# walk of each of the PARTITION_PROBES biggest partitions alone holds the recall floor.
PARTITION_EF_SCALES = (0.125, 0.25, 0.5, 1.0)
PARTITION_PROBES = 3


def derive(points: list[dict[str, Any]], k: int, target: float) -> list[list[Any]]:
    """Plan rows for one k from measured points {share, path, recall, recall_se, p50_ms}: at each
    share the fastest path meeting the recall target (not measurably below it: RECALL_SE_TOLERANCE
    standard errors), exact unless another is EXACT_MARGIN faster (exact is always right, and a timing
    on a loaded machine is noisy), switching halfway (geometric mean) between two measured shares;
    consecutive rows with one path merge."""
    shares = sorted({p["share"] for p in points})
    best: list[str] = []
    for s in shares:
        here = [p for p in points if p["share"] == s]
        exact = next((p for p in here if p["path"] == "exact"), None)
        ok = [
            p
            for p in here
            if p["path"] != "exact"
            and p["recall"] + RECALL_SE_TOLERANCE * p.get("recall_se", 0.0) >= target
            and (exact is None or p["p50_ms"] < EXACT_MARGIN * exact["p50_ms"])
        ]
        best.append(min(ok, key=lambda p: p["p50_ms"])["path"] if ok else "exact")
    rows: list[list[Any]] = []
    for i, (s, path) in enumerate(zip(shares, best)):
        upper = 1.0 if i == len(shares) - 1 else math.sqrt(s * shares[i + 1])
        if rows and rows[-1][2] == path:
            rows[-1][1] = round(upper, 6)
        else:
            rows.append([int(k), round(upper, 6), path])
    return rows


def categories_for_share(cats: np.ndarray, share: float, rng: np.random.Generator) -> tuple[list[int], int]:
    """Whole categories (codes >= 0) in a random order until about `share` of `cats` is kept, none
    overshooting it by much; returns (codes, items kept)."""
    codes, counts = np.unique(cats[cats >= 0], return_counts=True)
    want, total, chosen = share * len(cats), 0, []
    for i in rng.permutation(len(codes)):
        if total >= 0.9 * want:
            break
        if total + counts[i] <= 1.2 * want:
            chosen.append(int(codes[i]))
            total += int(counts[i])
    return chosen, total


def share_mask(index: SlotIndex, share: float, rng: np.random.Generator) -> Mask:
    """A mask keeping about `share` of the slots, made of whole categories in a random order when the
    index has them (real filters follow categories, and categories follow the vectors' clusters: the
    hard case for graph search), topped up with random items when the categories cannot reach it."""
    ok = index.slot_returnable
    want = max(1, int(round(share * len(ok))))
    chosen, _ = categories_for_share(np.where(ok, index.slot_categories, -1), share, rng)
    keep = np.isin(index.slot_categories, chosen) & ok
    short = want - int(keep.sum())
    if short > 0.1 * want:  # few categories, or all too big: random items make up the rest
        free = np.flatnonzero(ok & ~keep)
        keep[rng.choice(free, min(len(free), short), replace=False)] = True
    return Mask(bits=keep, count=int(keep.sum()))


def measure(
    index: SlotIndex,
    queries: np.ndarray,
    k: int,
    shares: tuple[float, ...] = SHARES,
    paths: tuple[str, ...] | None = None,
    n_time: int = CALIBRATION_QUERIES,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    draws: int = MASK_DRAWS,
) -> list[dict[str, Any]]:
    """Recall@k (vs exact search over the same mask) and one-query p50/p99 ms of each path at each
    share of the catalog; `params` are search params over the index's defaults. Recall is the worst
    over `draws` masks of the share (each of other categories; `recall_draws` lists them all), timing
    on the first."""
    rng = np.random.default_rng(seed)
    p = {**index.search_defaults, **(params or {})}
    points = []
    for share in shares:
        masks = [share_mask(index, share, rng) for _ in range(max(1, draws))]
        masks = [m for m in masks if m.count]
        if not masks:
            continue
        mask = masks[0]
        # at most k kept: every path is the exact one (plan.choose), so only that one is measured
        todo = ("exact",) if mask.count <= k else (paths or index.filter_paths)

        def along(path: str, mask: Mask) -> Callable[[np.ndarray], np.ndarray]:
            return lambda q: index.run_path(q, k, p, mask, path)[0]

        ms = time_paths({path: along(path, mask) for path in todo}, queries[:n_time])
        found: dict[str, list[tuple[float, float]]] = {path: [] for path in todo}
        for m in masks if todo != ("exact",) else masks[:1]:
            truth, _ = index.exact_search_slots(queries, k, m)
            for path in todo:
                got = along(path, m)(queries)
                found[path].append((recall_at_k(got, truth), recall_standard_error(got, truth)))
        for path in todo:
            p50, p99 = np.percentile(ms[path], [50, 99])
            recall, se = min(found[path])
            points.append(
                {
                    "share": share,
                    "kept": mask.count,
                    "path": path,
                    "k": k,
                    "recall": round(recall, 5),
                    "recall_se": round(se, 5),
                    "recall_draws": [round(r, 5) for r, _ in found[path]],
                    "p50_ms": round(float(p50), 4),
                    "p99_ms": round(float(p99), 4),
                }
            )
            log.debug("filter calibration %s: %s", index.kind, points[-1])
    return points


def partition_ef_scale(index: SlotIndex, queries: np.ndarray, k: int, floor: float) -> float:
    """The smallest PARTITION_EF_SCALES entry at which the partition path's recall@k holds `floor`
    on a filter of each of the biggest partitions' values (masks made of many small values are
    mostly scanned, and would pass any beam); 1.0 when none does."""
    info = index.partition_info()
    if info is None:
        raise ConfigError(f"{index.describe()} has no partitions (build it with partition_by=ATTRIBUTE)")
    biggest = sorted(zip(info["sizes"], info["values"]), reverse=True)[:PARTITION_PROBES]
    ok = index.slot_returnable
    table = index.slot_categories if info["by"] == "category" else index.slot_attributes[info["by"]]
    masks = [Mask(bits=b, count=int(b.sum())) for b in (ok & (table == value) for _, value in biggest)]
    masks = [m for m in masks if m.count > k]
    truths = [index.exact_search_slots(queries, k, m)[0] for m in masks]
    for scale in PARTITION_EF_SCALES:
        p = {**index.search_defaults, "partition_ef_scale": scale}
        got = [recall_at_k(index.run_path(queries, k, p, m, "partition")[0], t) for m, t in zip(masks, truths)]
        log.info("partition beam at %.3f x ef=%s, k=%d: recall %s", scale, p.get("ef"), k, [round(r, 4) for r in got])
        if all(r >= floor for r in got):
            return scale
    return 1.0


def partition_walk_cost(index: SlotIndex, queries: np.ndarray, k: int, n_time: int = CALIBRATION_QUERIES) -> float:
    """Rows a brute-force scan gets through in the time one partition walk spends per unit of its
    beam, timed on the biggest partition (its walk against a scan of its items, in turns): the
    route walks a partition only where more of its items qualify than that times the beam."""
    parts = index.partitions  # type: ignore[attr-defined]  # only indexes with the partition path
    sub = max(parts.subs, key=len)
    slots = np.sort(sub.slot_ids[sub.slot_alive])
    scan = Mask.from_slots(slots, index.n_slots)
    beam = parts.beam(k, index.search_defaults)
    p = {**index.search_defaults, "ef": beam, "filter_path": "auto", "filter_plan": [], "exact_below": 0}
    ms = time_paths(
        {
            "walk": lambda row: sub.library_search_slots(row, k, p, None),
            "scan": lambda row: index.exact_search_slots(row, k, scan),
        },
        queries[:n_time],
    )
    cost = float(len(slots) * float(np.median(ms["walk"]) / np.median(ms["scan"])) / beam)
    log.info(
        "partition walk at ef=%d, k=%d: %.2f ms, a scan of its %d items %.2f ms: %.1f rows per unit of beam",
        beam,
        k,
        np.median(ms["walk"]),
        len(slots),
        np.median(ms["scan"]),
        cost,
    )
    return round(cost, 2)


def calibrate(
    index: Index,
    queries: Any,
    ks: tuple[int, ...] = (100,),
    target: float = 0.95,
    shares: tuple[float, ...] = SHARES,
    n_queries: int = 200,
    seed: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """Measure every path at each share and store the plan on the index (search_defaults
    filter_plan; exact_below 0, since the plan's exact rows now decide). A path qualifies at a share
    when its recall reaches `target`, or the index's own unfiltered recall at k less RECALL_SLACK
    when that is lower; within RECALL_SE_TOLERANCE standard errors of it, unless `strict` (queries
    that are not the users' own, e.g. made from the items: no allowance, the measured recall must
    reach the floor). An index with partitions first gets its partition beam (partition_ef_scale)
    and the measured cost of a walk (partition_walk_cost), the largest any k needs. Returns what
    was measured. Only a plain backend has a plan (a sharded index's shards plan with the defaults)."""
    if not isinstance(index, SlotIndex):
        raise ConfigError(
            f"a filter plan is measured on a plain index, not on {index.describe()} "
            "(its shards use the default thresholds)"
        )
    q = as_vectors(queries, index.dim, "calibration queries")
    if len(q) > n_queries:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), n_queries, replace=False))]
    t0 = time.perf_counter()
    points: list[dict[str, Any]] = []
    table: list[list[Any]] = []
    floors = {}
    partitioned = "partition" in index.filter_paths and index.partition_info()
    scales, costs = {}, {}
    for k in ks:
        # An index tuned below the target unfiltered is held to its own unfiltered recall (less a
        # little): else every masked search (one hidden item makes a mask) would go brute force.
        unfiltered = recall_at_k(index.search(q, int(k)).ids, index.exact_search(q, int(k)).ids)
        floors[int(k)] = floor = min(target, unfiltered - RECALL_SLACK)
        if partitioned:
            scales[int(k)] = index.search_defaults["partition_ef_scale"] = partition_ef_scale(index, q, int(k), floor)
            costs[int(k)] = index.search_defaults["partition_walk_cost"] = partition_walk_cost(index, q, int(k))
        pts = measure(index, q, int(k), shares, seed=seed)
        points += pts
        table += derive([{**p, "recall_se": 0.0} for p in pts] if strict else pts, int(k), floor)
    if scales:  # one value for every k: the widest beam, and the dearest walk (scanned more: exact)
        index.search_defaults["partition_ef_scale"] = max(scales.values())
        index.search_defaults["partition_walk_cost"] = max(costs.values())
    index.search_defaults["filter_plan"] = table
    index.search_defaults["exact_below"] = 0
    result = {
        "ks": list(ks),
        "target": target,
        "recall_floor": floors,
        "queries": len(q),
        "strict": strict,
        "plan": table,
        "points": points,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if scales:
        result["partition_ef_scale"], result["partition_walk_cost"] = scales, costs
    index.filter_calibration = result
    log.info("filter plan of %s: %s (%.1fs)", index.describe(), table, result["seconds"])
    return result


def time_paths(runs: dict[str, Callable[[np.ndarray], Any]], q: np.ndarray) -> dict[str, np.ndarray]:
    """Milliseconds of one query at a time for each path, the paths taking turns on each query, so
    that a burst of load on a shared machine hits them alike; single-threaded (tune.single_threaded),
    as a server worker searches: a second BLAS thread on a shared 2-core machine made filtered searches
    over 20k items take 5 to 42 ms. Callers decide on medians."""
    out = {path: np.empty(len(q)) for path in runs}
    with single_threaded():
        for i, row in enumerate(q):
            for path, run in runs.items():
                if i == 0:
                    run(row[None, :])  # warm-up
                t0 = time.perf_counter()
                run(row[None, :])
                out[path][i] = (time.perf_counter() - t0) * 1e3
    return out

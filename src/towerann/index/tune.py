"""Pick the cheapest search parameters that reach a recall target, measured on *query* vectors.

Recall is measured against exact search over the same items, on a sample of user-tower query
vectors: they are distributed differently from item vectors, and tuning on items overestimates
recall. (`towerann.index.build` decides the kind; this module only measures and picks parameters.)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from tqdm import tqdm

from towerann.errors import BadRequest
from towerann.index.interleaved import CONTENDER_RATIO, Contender, medians, steady_winner, timed_in_turns
from towerann.index.protocol import Index, as_vectors
from towerann.index.recall import recall_at_k as recall_at_k  # re-exported: callers import it from here

log = logging.getLogger(__name__)

LATENCY_QUERIES = 50  # one-query searches timed per setting


TRUTH_SCORES = 1 << 26  # query x item scores of one ground-truth block (256 MB of float32)
# A tuned setting pays only when its p50 is under this fraction of exact search's: above it, an ANN index
# buys a recall loss, a build and its memory for little time saved (ivfpq at recall 0.95, k 1000 over
# 300k items tuned to 8.00 ms against exact's 8.04). `auto` drops a kind that does not pay.
PAYS_RATIO = 0.8
# ivfpq also approximates every score (PQ codes) and reads its re-rank rows from disk: it pays only at
# under a third of exact search's time (at 30k items it tuned to 0.62x exact; at 1M and 10M, 1/40 and
# less). hnsw and scann keep 0.8: at 30k they tune to ~0.3-0.45x, so a 1/3 line would flip auto's choice.
PAYS_RATIO_BY_KIND = {"ivfpq": 1 / 3}


def pays_ratio(kind: str) -> float:
    """The fraction of exact search's p50 under which a kind's tuned setting pays."""
    return PAYS_RATIO_BY_KIND.get(kind, PAYS_RATIO)


@contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS and OpenMP (faiss's included) on one thread: how a server worker searches, and what keeps
    a timing steady on a shared machine (a second BLAS thread made one exact search 0.11 or 8 ms)."""
    import faiss
    from threadpoolctl import threadpool_limits

    omp = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        faiss.omp_set_num_threads(omp)


def one_query_p50_ms(search: Callable[[np.ndarray], Any], queries: np.ndarray, n: int = LATENCY_QUERIES) -> float:
    """Median milliseconds of `search` on one query at a time (the serving path), after a warm-up,
    single-threaded as a server worker searches."""
    q = queries[:n]
    times = np.empty(len(q))
    with single_threaded():
        for row in q[:3]:
            search(row[None, :])
        for i, row in enumerate(q):
            t0 = time.perf_counter()
            search(row[None, :])
            times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e3)


# How the tuner times a setting: (kind, params, search, queries) -> one-query p50 ms, where kind is the
# index's kind and params its setting, or ("exact", None) for the exact-search baseline. The default
# measures; tests pass a fixed cost model, so that what they check (the choice follows the timings)
# does not hang on the machine's load.
Timer = Callable[[str, "dict[str, Any] | None", Callable[[np.ndarray], Any], np.ndarray], float]


def measured_p50_ms(
    kind: str, params: dict[str, Any] | None, search: Callable[[np.ndarray], Any], queries: np.ndarray
) -> float:
    return one_query_p50_ms(search, queries)


def not_paying(tuning: dict[str, Any] | None, kind: str) -> str | None:
    """One line saying that a tuning record's setting does not pay (`pays` false), else None."""
    if not tuning or tuning.get("pays") is not False:
        return None
    others = " or ".join(k for k in ("exact", "hnsw") if k != kind)
    p50, exact = tuning.get("p50_ms"), tuning.get("exact_p50_ms")
    speed = f"{p50 / exact:.2f}x exact search's time" if p50 and exact else "no faster than exact search"
    need = "" if pays_ratio(kind) == PAYS_RATIO else f" (it pays under {pays_ratio(kind):.2g}x)"
    return f"{kind} at recall {tuning.get('target'):g} is {speed}{need}: use --kind {others}"


def _retime_contenders(
    index: Index,
    k: int,
    q: np.ndarray,
    curve: list[dict[str, Any]],
    best: dict[str, Any],
    exact_ms: float,
    ground: Index,
    target_recall: float,
    timer: Timer,
) -> tuple[dict[str, Any], float]:
    """The settings reaching the target within CONTENDER_RATIO of the best p50 (and exact search, when it
    is within twice the best: the `pays` line) timed again in turns (index.interleaved); returns the
    setting kept and the exact p50 by those timings: the least work of them (the first in the sweep)
    unless another is faster by FASTER_BY (interleaved.steady_winner). The points' p50_ms become the
    in-turns medians."""
    near = [
        p
        for p in curve
        if "refused" not in p and p["recall"] >= target_recall and p["p50_ms"] <= CONTENDER_RATIO * best["p50_ms"]
    ]
    with_exact = exact_ms <= 2 * best["p50_ms"]
    if len(near) + with_exact < 2:
        return best, exact_ms
    contenders: list[Contender] = [
        (index.kind, p["params"], functools.partial(index.search, k=k, params=p["params"] or None)) for p in near
    ]
    if with_exact:
        contenders.append(("exact", None, lambda x: ground.exact_search(x, k)))
    rounds = timed_in_turns(contenders, q, timer)
    times = medians(rounds)
    for p, t in zip(near, times):
        p["p50_ms"], p["timed_in_turns"] = round(t, 4), True
    log.info("tune %s: %d contenders timed in turns: %s", index.kind, len(times), times)
    return near[steady_winner(rounds[:, : len(near)])], times[-1] if with_exact else exact_ms


def tune(
    index: Index,
    queries: Any,
    k: int,
    target_recall: float,
    exact: Index | None = None,
    max_queries: int = 500,
    seed: int = 0,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Measure the backend's search settings (cheap -> expensive by estimated work) and keep the one
    with the lowest measured one-query p50 among those reaching `target_recall` (settings near it are
    timed again in turns, and the least work of them is kept unless another is steadily faster).

    A setting is never chosen when any of its rows fell back to exact search (the library came up
    short: that is brute force, not ANN recall) or when it is slower than exact search itself. The
    sweep stops once settings run at twice the best latency found. Sets the result as
    `index.search_defaults` (and `index.tuning`) and returns {"params", "recall", "p50_ms", "k",
    "target", "queries", "reached", "exact_p50_ms", "pays", "curve"}; the curve holds every setting
    measured; `pays` is false (and a warning logged) unless the chosen p50 is under pays_ratio(kind)
    x exact search's.
    Ground truth comes from `exact` (an exact index over the same items) or brute force over the
    index's own vectors. `timer` times each setting (see Timer; default measured_p50_ms, looked up when
    called, so a test can swap the module's for a fixed cost model on paths it cannot pass one down).
    """
    timer = timer or measured_p50_ms
    if not 0.0 < target_recall <= 1.0:
        raise BadRequest(f"target recall must be in (0, 1], got {target_recall}")
    q = as_vectors(queries, index.dim, "tuning queries")
    if len(q) > max_queries:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), max_queries, replace=False))]
    ground = exact if exact is not None else index
    # A few queries at a time: all of them at once would score [m, n] (1000 queries x 10M items: 40 GB).
    step = max(1, TRUTH_SCORES // max(ground.n_slots, 1))
    truth = np.concatenate([ground.exact_search(q[s : s + step], k).ids for s in range(0, len(q), step)])
    exact_ms = timer("exact", None, lambda x: ground.exact_search(x, k), q)
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # the fastest setting reaching the target
    best_recall: dict[str, Any] | None = None  # the best recall of any usable setting (target not reached)
    space = index.search_space(k)
    # updated as each setting starts, closed with why it stopped when that is before the last setting
    bar = tqdm(total=len(space), desc=f"tune {index.kind}", disable=None if len(space) > 1 else True)
    stopped = ""
    for params in space:
        bar.update()
        res = index.search(q, k, params=params or None)
        point: dict[str, Any] = {
            "params": params,
            "recall": round(recall_at_k(res.ids, truth), 6),
            "exact_rows": round(res.exact_rows / len(q), 4),
        }
        curve.append(point)
        if res.exact_rows:
            point["refused"] = "rows fell back to exact search"
            continue
        search = functools.partial(index.search, k=k, params=params or None)
        point["p50_ms"] = round(timer(index.kind, params, search, q), 4)
        log.info("tune %s: %s", index.kind, point)
        if point["p50_ms"] > exact_ms:
            point["refused"] = "slower than exact search"
            continue
        if best_recall is None or point["recall"] > best_recall["recall"]:
            best_recall = point
        if point["recall"] >= target_recall and (best is None or point["p50_ms"] < best["p50_ms"]):
            best = point
        if best is not None and point["p50_ms"] > 2 * best["p50_ms"]:
            if bar.n < len(space):
                stopped = (
                    f"stopped: recall {best['recall']:.3f} >= {target_recall:g} reached at "
                    f"{best['p50_ms']:.3g} ms; the next settings are over twice as slow"
                )
            break
    if stopped:
        bar.set_postfix_str(stopped, refresh=False)
        log.info("tune %s: %d of %d settings measured, %s", index.kind, bar.n, len(space), stopped)
    bar.close()
    if best is not None:
        best, exact_ms = _retime_contenders(index, k, q, curve, best, exact_ms, ground, target_recall, timer)
    chosen = best or best_recall
    result: dict[str, Any] = {
        "k": k,
        "target": target_recall,
        "queries": len(q),
        "exact_p50_ms": round(exact_ms, 4),
        "curve": curve,
    }
    if chosen is None and all(p["exact_rows"] == 1 for p in curve):  # brute force answers every search
        log.warning(
            "tune %s: every search is answered by exact search at this size (%d items, masked); the "
            "search defaults stay, and an exact index would serve as well",
            index.kind,
            len(index),
        )
        result.update(params={}, recall=1.0, p50_ms=round(exact_ms, 4), reached=True, exact_path=True, pays=False)
    elif chosen is None:  # rows fall back, or the library is slower than brute force, at every setting
        log.warning(
            "tune %s: no setting returns k rows from the library at least as fast as exact search "
            "(%d items); the search defaults stay - build a denser index, or use the exact backend",
            index.kind,
            len(index),
        )
        recall = recall_at_k(index.search(q, k).ids, truth)
        result.update(params={}, recall=round(recall, 6), p50_ms=None, reached=False, pays=False)
    else:
        result.update(
            params=chosen["params"],
            recall=chosen["recall"],
            p50_ms=chosen["p50_ms"],
            reached=chosen["recall"] >= target_recall,
            pays=chosen["p50_ms"] < pays_ratio(index.kind) * exact_ms,
        )
        if not result["pays"]:
            log.warning("tune %s: %s", index.kind, not_paying(result, index.kind))
        if not result["reached"]:
            log.warning(
                "tune %s: recall@%d target %.3f not reached; best %.4f with %s (a bigger build, e.g. "
                "larger M or nlist, or the exact backend, may be needed)",
                index.kind,
                k,
                target_recall,
                chosen["recall"],
                chosen["params"],
            )
    index.search_defaults = {**index.search_defaults, **result["params"]}
    index.tuning = result
    return result

"""The one way to build an index: a kind (or "auto"), build and search parameters, optional tuning.

Used by `towerann index build`, by bundle publishing (demo, refresh, benchmarks) and by tests, so
"auto" means the same everywhere and a tuned build is described by one small `Tuning` value.

"auto" decides by measurement: below AUTO_EXACT_ITEMS brute force; above, with tuning queries, it
builds each installed candidate backend, tunes it, and keeps the one with the lowest measured p50
that reaches the target (else the best recall): two reaching it are timed again in turns
(index.interleaved), and the one tried later wins only when it is steadily faster. A candidate that
reaches the target but does not pay (index.tune.pays_ratio: p50 under 0.8x exact search's, ivfpq
under 1/3) is dropped, and when every one reaching it is dropped, auto builds brute force;
`index.tuning["auto"]` records every candidate and why the winner won. Without queries there is
nothing to measure: hnsw, untuned, at UNTUNED_SEARCH's settings.

A tuned build also measures its filter plan (`filter_plan.calibrate` on the tuning queries at the
tuning k and recall), so an index searched as built plans filtered searches as a published bundle
does. `calibrate_filters=True` without tuning measures the plan on queries made from the catalog's
own items (`item_queries`), holding every planned path to its recall floor with no allowance for noise.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from towerann.errors import BackendUnavailable, ConfigError
from towerann.index import SHARDED, backend_class, create
from towerann.index.base import SlotIndex
from towerann.index.filter_plan import calibrate
from towerann.index.interleaved import Contender, medians, steady_winner, timed_in_turns
from towerann.index.protocol import COMMON_SEARCH, Index, as_vectors
from towerann.index.tune import Timer, measured_p50_ms, not_paying, pays_ratio, tune

log = logging.getLogger(__name__)

# kind="auto": brute force below this many items (a gemv over <20k x 128 floats is well under a
# millisecond and exact), else hnsw tuned to the recall target.
AUTO_EXACT_ITEMS = 20_000
AUTO_CANDIDATES = ("hnsw", "ivfpq", "scann")  # tried in this order; scann only where it is installed
AUTO_BUDGET_S = 1800.0  # candidates are not started once building and tuning have taken this long
AUTO_HELP = (
    f"auto = exact below {AUTO_EXACT_ITEMS:,} items, else the fastest of {'/'.join(AUTO_CANDIDATES)} "
    "at the recall target, measured on the tuning queries (a kind not under 0.8x exact search's time, ivfpq 1/3, "
    "is dropped)"
)

# Search settings of an untuned build (no tuning queries), over the backend's defaults. HNSW: ef 256
# (its class default) gave recall@100 0.90-0.92 at 50k far-off items (synth_vectors' item-mean
# queries, dim 128 and 64); ef 512 gives 0.962 and 0.971 (448: 0.955 and 0.965).
UNTUNED_SEARCH: dict[str, dict[str, Any]] = {"hnsw": {"ef": 512}}
# Without tuning queries the filter plan is measured on this many queries made from the items, to this
# recall (each planned path's floor is the lower of it and the index's own unfiltered recall less a little).
ITEM_QUERIES = 200
UNTUNED_TARGET = 0.95


@dataclass(frozen=True)
class Tuning:
    """Tune search parameters to `recall`@`k` against exact search, on user-tower `queries`."""

    queries: np.ndarray
    k: int = 1000
    recall: float = 0.95


def resolve_kind(kind: str, n_items: int, auto_exact_items: int = AUTO_EXACT_ITEMS) -> str:
    if kind == SHARDED:
        return kind  # its backend is checked when the shards are made
    if kind != "auto":
        backend_class(kind)  # an unknown kind fails here, with the list of kinds
        return kind
    return "exact" if n_items < auto_exact_items else "hnsw"


def item_queries(vectors: np.ndarray, n: int = ITEM_QUERIES, seed: int = 0) -> np.ndarray:
    """Queries made from a catalog's items when no user-tower queries are given: each the mean of 3 to 8
    random items plus isotropic noise of the mean's own size (as towerann.data.synth_vectors makes
    them), normalised. They sit between items, as user vectors do; an item's own vector would find
    itself first and overstate recall."""
    v = np.asarray(vectors, np.float32)
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 9, n)
    picks = rng.integers(0, len(v), (n, 8))
    use = np.arange(8)[None, :] < counts[:, None]
    mean = (v[picks] * use[:, :, None]).sum(axis=1) / counts[:, None].astype(np.float32)
    size = np.linalg.norm(mean, axis=1, keepdims=True) / np.sqrt(np.float32(v.shape[1]))
    q = mean + size * rng.standard_normal(mean.shape, dtype=np.float32)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    out: np.ndarray = (q / np.where(norm > 0, norm, 1)).astype(np.float32)
    return out


def split_params(kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(build params, search params) of a backend, from one mixed dict (e.g. --param M=32 --param ef=512).
    A sharded index's search params are those of its shards' backend (sent to every shard)."""
    plain = params.get("backend", "exact") if kind == SHARDED else kind
    search_keys = {*COMMON_SEARCH, *backend_class(plain).default_search}
    return (
        {k: v for k, v in params.items() if k not in search_keys},
        {k: v for k, v in params.items() if k in search_keys},
    )


def build_index(
    vectors: Any,
    ids: Any,
    categories: Any = None,
    available: Any = None,
    *,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    tuning: Tuning | None = None,
    metric: str = "ip",
    auto_exact_items: int = AUTO_EXACT_ITEMS,
    auto_kinds: tuple[str, ...] = AUTO_CANDIDATES,
    auto_budget_s: float = AUTO_BUDGET_S,
    timer: Timer | None = None,
    calibrate_filters: bool | None = None,
    filter_k: int = 100,
) -> Index:
    """Build an index over a catalog's vectors; tune it when `tuning` is given.

    Explicit search params in `params` win over tuned ones. With kind="auto", each candidate takes
    the params it understands (brute force takes none). kind="sharded" (params
    "shards" and "backend") tunes the shards' search params. `timer`
    times the tuner's settings (index.tune.Timer).

    calibrate_filters (None: when tuning): measure the filter plan (`filter_plan.calibrate`) on the
    tuning queries at tuning.k and tuning.recall, or without tuning on `item_queries` at `filter_k` and
    UNTUNED_TARGET. No plan for brute force, a sharded index (its shards keep the default
    thresholds) or a catalog of at most k items (every masked search keeps at most k: exact)."""
    v = np.asarray(vectors)
    if calibrate_filters is None:
        calibrate_filters = tuning is not None
    if kind == "auto" and len(v) >= auto_exact_items and tuning is not None:
        best = _build_fastest(
            v, ids, categories, available, dict(params or {}), tuning, metric, auto_kinds, auto_budget_s, timer
        )
        if calibrate_filters:  # the winner only: a losing candidate's plan would be measured for nothing
            _calibrate(best, v, tuning, filter_k, split_params(best.kind, _accepted(best.kind, dict(params or {})))[1])
        return best
    resolved = resolve_kind(kind, len(v), auto_exact_items)
    build, search = split_params(resolved, dict(params or {}))
    if resolved == "exact" and kind == "auto" and build:
        log.info("auto index: %d items -> exact; build params %s do not apply", len(v), sorted(build))
        build = {}
    index = create(resolved, v.shape[1], metric, **build)
    index.build(v, ids, categories, available)
    brute = (build.get("backend", "exact") if resolved == SHARDED else resolved) == "exact"
    return finish_build(index, v, search, tuning, timer, calibrate_filters, filter_k, brute=brute, auto=kind == "auto")


def finish_build(
    index: Index,
    vectors: np.ndarray,
    search: dict[str, Any],
    tuning: Tuning | None,
    timer: Timer | None = None,
    calibrate_filters: bool = False,
    filter_k: int = 100,
    *,
    brute: bool = False,
    auto: bool = False,
) -> Index:
    """What build_index does after the index holds the catalog (a resumable build's too): explicit search
    params, then tuning (or the untuned defaults), then the filter plan. `vectors`: the catalog's, for
    item-made calibration queries when there is no tuning; `brute`: an exact index, nothing to tune."""
    index.search_defaults.update(search)  # before tuning: it must measure the path the index will serve
    if brute:
        index.tuning = {
            "params": {},
            "recall": 1.0,
            "k": tuning.k if tuning else None,
            "target": tuning.recall if tuning else None,
            "queries": 0,
            "reached": True,
        }
    elif tuning is not None:
        tune(index, tuning.queries, tuning.k, tuning.recall, timer=timer)
    else:
        index.search_defaults.update(UNTUNED_SEARCH.get(index.kind, {}))
        if auto:
            log.warning("auto index: no tuning queries given, so the %s search defaults are untuned", index.kind)
    index.search_defaults.update(search)  # and after: explicit params win over tuned ones
    if calibrate_filters:
        _calibrate(index, vectors, tuning, filter_k, search)
    log.info("built %s over %d items (kind %s)", index.describe(), len(index), "auto" if auto else index.kind)
    return index


def _calibrate(index: Index, vectors: np.ndarray, tuning: Tuning | None, filter_k: int, search: dict[str, Any]) -> None:
    """The filter plan of a built index (build_index's calibrate_filters), explicit search params winning."""
    k = tuning.k if tuning is not None else filter_k
    if index.kind == SHARDED:
        log.info("sharded index: no filter plan measured (the shards use the default thresholds)")
        return
    if not isinstance(index, SlotIndex) or index.kind == "exact" or len(index) <= k:
        return  # brute force needs no plan; at most k items, every masked search is exact
    if tuning is not None:
        calibrate(index, tuning.queries, ks=(k,), target=tuning.recall)
    else:
        calibrate(index, item_queries(vectors), ks=(k,), target=UNTUNED_TARGET, strict=True)
        if index.filter_calibration is not None:
            index.filter_calibration["queries_from"] = "items"
    index.search_defaults.update(search)  # explicit params win over the plan's exact_below


def _accepted(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of mixed params that a backend takes (its build args and search params)."""
    build_args = set(inspect.signature(backend_class(kind).__init__).parameters) - {"self", "dim", "metric"}
    search = {*COMMON_SEARCH, *backend_class(kind).default_search}
    return {k: v for k, v in params.items() if k in build_args or k in search}


def _build_fastest(
    vectors: np.ndarray,
    ids: Any,
    categories: Any,
    available: Any,
    params: dict[str, Any],
    tuning: Tuning,
    metric: str,
    kinds: tuple[str, ...],
    budget_s: float,
    timer: Timer | None,
) -> Index:
    """Build and tune each candidate; keep the fastest at the target (else the best recall)."""
    unknown = set(params) - {key for kind in kinds for key in _accepted(kind, params)}
    if unknown:
        raise ConfigError(f"params {sorted(unknown)} are taken by none of the auto candidates {', '.join(kinds)}")
    t_start = time.perf_counter()
    best: Index | None = None
    report: list[dict[str, Any]] = []
    for kind in kinds:
        if time.perf_counter() - t_start > budget_s:
            report.append({"kind": kind, "skipped": f"build budget of {budget_s:.0f}s spent"})
            continue
        t0 = time.perf_counter()
        try:
            index = build_index(
                vectors,
                ids,
                categories,
                available,
                kind=kind,
                params=_accepted(kind, params),
                tuning=tuning,
                metric=metric,
                timer=timer,
                calibrate_filters=False,
            )
        except BackendUnavailable as e:
            report.append({"kind": kind, "skipped": str(e)})
            continue
        t = index.tuning or {}
        report.append(
            {
                "kind": kind,
                "describe": index.describe(),
                "build_and_tune_s": round(time.perf_counter() - t0, 2),
                "params": t.get("params"),
                "recall": t.get("recall"),
                "p50_ms": t.get("p50_ms"),
                "reached": bool(t.get("reached")) and not t.get("exact_path"),
                "pays": t.get("pays"),
                "exact_p50_ms": t.get("exact_p50_ms"),
            }
        )
        if report[-1]["reached"] and not _serves(t):
            report[-1]["dropped"] = not_paying(t, kind)
        if best is not None and _both_reached(index, best):
            turns, challenger_wins = _head_to_head(best, index, tuning, timer or measured_p50_ms)
            report[-1]["head_to_head"] = turns
            better = challenger_wins
        else:
            better = best is None or _better(index, best)
        if better:
            best = index
        del index
        gc.collect()  # a losing candidate's memory goes before the next one is built
    if best is None:
        raise BackendUnavailable(f"auto index: none of {', '.join(kinds)} could be built ({report})")
    if not _serves(best.tuning or {}) and any(r.get("dropped") for r in report):
        best = None  # the dropped candidate's memory goes first
        gc.collect()
        best = build_index(vectors, ids, categories, available, kind="exact", tuning=tuning, metric=metric)
        lines = [f"{r['kind']} under {pays_ratio(r['kind']):.2g}x exact search's" for r in report if r.get("dropped")]
        why = f"no candidate reached the target in a time that pays ({', '.join(lines)}); exact always reaches it"
    elif next(r for r in report if r["kind"] == best.kind)["reached"]:
        why = "the fastest of the candidates reaching the target"
        if any("head_to_head" in r for r in report):
            why += " (timed head to head, in turns)"
    else:
        why = "no candidate reached the target; the best recall"
    best.tuning = {**(best.tuning or {}), "auto": {"chosen": best.kind, "why": why, "candidates": report}}
    log.warning(
        "auto index: %s (%s); candidates %s",
        best.kind,
        why,
        [(r["kind"], r.get("recall"), r.get("p50_ms"), r.get("exact_p50_ms")) for r in report],
    )
    return best


def _serves(t: dict[str, Any]) -> bool:
    """A tuning record auto may keep: the target reached off the exact path, by a setting that pays."""
    return bool(t.get("reached")) and not t.get("exact_path") and t.get("pays") is not False


def _both_reached(a: Index, b: Index) -> bool:
    """Both tuned indexes reach the target off the exact path, and pay: a timing decides between them."""
    return all(_serves(t) and t.get("p50_ms") for t in (a.tuning or {}, b.tuning or {}))


def _head_to_head(kept: Index, challenger: Index, tuning: Tuning, timer: Timer) -> tuple[dict[str, float], bool]:
    """Each index's p50 (ms) at its tuned setting, the two timed in turns (index.interleaved) on the
    tuning queries (each was tuned at another moment, and a burst of load in one's turn decided before),
    and whether the challenger wins: it is faster by FASTER_BY (interleaved.steady_winner), so a tie
    keeps the candidate tried first and three builds of one catalog choose alike."""
    q = as_vectors(tuning.queries, kept.dim, "tuning queries")
    contenders: list[Contender] = [
        (ix.kind, (ix.tuning or {}).get("params"), functools.partial(ix.search, k=tuning.k))
        for ix in (kept, challenger)
    ]
    rounds = timed_in_turns(contenders, q, timer)
    times = medians(rounds)
    log.info("auto index: %s %.4f ms vs %s %.4f ms, timed in turns", kept.kind, times[0], challenger.kind, times[1])
    turns = {kept.kind: round(times[0], 4), challenger.kind: round(times[1], 4)}
    return turns, steady_winner(rounds) == 1


def _better(a: Index, b: Index) -> bool:
    """Does tuned index `a` beat `b`, when not both reach the target and pay (those are timed head to
    head): reaching it and paying beats not; else the better recall."""
    ta, tb = a.tuning or {}, b.tuning or {}
    ra, rb = _serves(ta), _serves(tb)
    if ra != rb:
        return ra
    return float(ta.get("recall") or 0) > float(tb.get("recall") or 0)

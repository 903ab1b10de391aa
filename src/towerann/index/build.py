"""The one way to build an index: a kind (or "auto"), build and search parameters, optional tuning.

Used by `towerann index build`, by bundle publishing (demo, refresh, benchmarks) and by tests, so
"auto" means the same everywhere and a tuned build is described by one small `Tuning` value.

"auto" decides by measurement: below AUTO_EXACT_ITEMS brute force; above, with tuning queries, it
builds each installed candidate backend, tunes it, and keeps the one with the lowest measured p50
that reaches the target (else the best recall); `index.tuning["auto"]` records every candidate
and why the winner won. Without queries there is nothing to measure: hnsw, untuned.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from towerann.errors import BackendUnavailable, ConfigError
from towerann.index import SHARDED, backend_class, create
from towerann.index.protocol import COMMON_SEARCH, Index
from towerann.index.tune import Timer, tune

log = logging.getLogger(__name__)

# kind="auto": brute force below this many items (a gemv over <20k x 128 floats is well under a
# millisecond and exact), else hnsw tuned to the recall target.
AUTO_EXACT_ITEMS = 20_000
AUTO_CANDIDATES = ("hnsw", "ivfpq", "scann")  # tried in this order; scann only where it is installed
AUTO_BUDGET_S = 1800.0  # candidates are not started once building and tuning have taken this long
AUTO_HELP = (
    f"auto = exact below {AUTO_EXACT_ITEMS:,} items, else the fastest of {'/'.join(AUTO_CANDIDATES)} "
    "at the recall target, measured on the tuning queries"
)


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
) -> Index:
    """Build an index over a catalog's vectors; tune it when `tuning` is given.

    Explicit search params in `params` win over tuned ones. With kind="auto", each candidate takes
    the params it understands (brute force takes none). kind="sharded" (params
    "shards" and "backend") tunes the shards' search params. `timer`
    times the tuner's settings (index.tune.Timer)."""
    v = np.asarray(vectors)
    if kind == "auto" and len(v) >= auto_exact_items and tuning is not None:
        return _build_fastest(
            v, ids, categories, available, dict(params or {}), tuning, metric, auto_kinds, auto_budget_s, timer
        )
    resolved = resolve_kind(kind, len(v), auto_exact_items)
    build, search = split_params(resolved, dict(params or {}))
    if resolved == "exact" and kind == "auto" and build:
        log.info("auto index: %d items -> exact; build params %s do not apply", len(v), sorted(build))
        build = {}
    index = create(resolved, v.shape[1], metric, **build)
    index.build(v, ids, categories, available)
    index.search_defaults.update(search)  # before tuning: it must measure the path the index will serve
    if (build.get("backend", "exact") if resolved == SHARDED else resolved) == "exact":  # brute force: nothing to tune
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
    elif kind == "auto":
        log.warning("auto index: no tuning queries given, so the %s search defaults are untuned", resolved)
    index.search_defaults.update(search)  # and after: explicit params win over tuned ones
    log.info("built %s over %d items (kind %s)", index.describe(), len(index), kind)
    return index


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
            }
        )
        if best is None or _better(index, best):
            best = index
        del index
        gc.collect()  # a losing candidate's memory goes before the next one is built
    if best is None:
        raise BackendUnavailable(f"auto index: none of {', '.join(kinds)} could be built ({report})")
    chosen = next(r for r in report if r["kind"] == best.kind)
    why = (
        "the lowest measured p50 among the candidates reaching the target"
        if chosen["reached"]
        else "no candidate reached the target; the best recall"
    )
    best.tuning = {**(best.tuning or {}), "auto": {"chosen": best.kind, "why": why, "candidates": report}}
    log.warning(
        "auto index: %s (%s); candidates %s",
        best.kind,
        why,
        [(r["kind"], r.get("recall"), r.get("p50_ms")) for r in report],
    )
    return best


def _better(a: Index, b: Index) -> bool:
    """Does tuned index `a` beat `b`: reaching the target beats not; then lower p50 (reaching) or recall."""
    ta, tb = a.tuning or {}, b.tuning or {}
    ra, rb = bool(ta.get("reached")) and not ta.get("exact_path"), bool(tb.get("reached")) and not tb.get("exact_path")
    if ra != rb:
        return ra
    if ra:
        return float(ta["p50_ms"]) < float(tb["p50_ms"])
    return float(ta.get("recall") or 0) > float(tb.get("recall") or 0)

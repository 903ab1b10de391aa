"""The one way to build an index: a kind (or "auto"), build and search parameters, optional tuning.

Used by `towerann index build`, by bundle publishing (demo, refresh, benchmarks) and by tests, so
"auto" means the same everywhere and a tuned build is described by one small `Tuning` value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from towerann.index import backend_class, create
from towerann.index.base import COMMON_SEARCH, Index
from towerann.index.tune import tune

log = logging.getLogger(__name__)

# kind="auto": brute force below this many items (a gemv over <20k x 128 floats is well under a
# millisecond and exact), else hnsw tuned to the recall target.
AUTO_EXACT_ITEMS = 20_000
AUTO_HELP = f"auto = exact below {AUTO_EXACT_ITEMS:,} items, else hnsw tuned to the recall target"


@dataclass(frozen=True)
class Tuning:
    """Tune search parameters to `recall`@`k` against exact search, on user-tower `queries`."""

    queries: np.ndarray
    k: int = 1000
    recall: float = 0.95


def resolve_kind(kind: str, n_items: int, auto_exact_items: int = AUTO_EXACT_ITEMS) -> str:
    if kind != "auto":
        backend_class(kind)  # an unknown kind fails here, with the list of kinds
        return kind
    return "exact" if n_items < auto_exact_items else "hnsw"


def split_params(kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(build params, search params) of a backend, from one mixed dict (e.g. --param M=32 --param ef=512)."""
    search_keys = {*COMMON_SEARCH, *backend_class(kind).default_search}
    return ({k: v for k, v in params.items() if k not in search_keys},
            {k: v for k, v in params.items() if k in search_keys})


def build_index(vectors: Any, ids: Any, categories: Any = None, available: Any = None, *, kind: str = "auto",
                params: dict[str, Any] | None = None, tuning: Tuning | None = None, metric: str = "ip",
                auto_exact_items: int = AUTO_EXACT_ITEMS) -> Index:
    """Build an index over a catalog's vectors; tune it when `tuning` is given.

    Explicit search params in `params` win over tuned ones. With kind="auto" resolving to exact,
    build params of the ANN backend are ignored (brute force has none)."""
    v = np.asarray(vectors)
    resolved = resolve_kind(kind, len(v), auto_exact_items)
    build, search = split_params(resolved, dict(params or {}))
    if resolved == "exact" and kind == "auto" and build:
        log.info("auto index: %d items -> exact; build params %s do not apply", len(v), sorted(build))
        build = {}
    index = create(resolved, v.shape[1], metric, **build)
    index.build(v, ids, categories, available)
    if resolved == "exact":
        index.tuning = {"params": {}, "recall": 1.0, "k": tuning.k if tuning else None,
                        "target": tuning.recall if tuning else None, "queries": 0, "reached": True}
    elif tuning is not None:
        tune(index, tuning.queries, tuning.k, tuning.recall)
    elif kind == "auto":
        log.warning("auto index: no tuning queries given, so the %s search defaults are untuned", resolved)
    index.search_defaults.update(search)
    log.info("built %s over %d items (kind %s)", index.describe(), len(index), kind)
    return index

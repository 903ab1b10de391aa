"""Pick the cheapest search parameters that reach a recall target, measured on *query* vectors.

Recall is measured against exact search over the same items, on a sample of user-tower query
vectors: they are distributed differently from item vectors, and tuning on items overestimates
recall. (`towerann.index.build` decides the kind; this module only measures and picks parameters.)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm import tqdm

from towerann.errors import BadRequest
from towerann.index.base import Index, as_vectors

log = logging.getLogger(__name__)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth| (padding -1 ignored; rows with no truth skipped)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        total += len(t)
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=True))
    return hits / total if total else 1.0


def tune(index: Index, queries: Any, k: int, target_recall: float, exact: Index | None = None,
         max_queries: int = 500, seed: int = 0) -> dict[str, Any]:
    """Sweep the backend's search parameters cheap -> expensive; keep the first reaching `target_recall`.

    Sets the result as `index.search_defaults` (and `index.tuning`) and returns
    {"params", "recall", "k", "target", "queries", "reached"}. Ground truth comes from `exact`
    (an exact index over the same items) or, by default, brute force over the index's own vectors.
    """
    if not 0.0 < target_recall <= 1.0:
        raise BadRequest(f"target recall must be in (0, 1], got {target_recall}")
    q = as_vectors(queries, index.dim, "tuning queries")
    if len(q) > max_queries:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), max_queries, replace=False))]
    truth = (exact if exact is not None else index).exact_search(q, k).ids
    best: tuple[float, dict[str, Any]] | None = None
    space = index.search_space(k)
    for params in tqdm(space, desc=f"tune {index.kind}", disable=None if len(space) > 1 else True):
        r = recall_at_k(index.search(q, k, params=params or None).ids, truth)
        log.info("tune %s: %s recall@%d=%.4f", index.kind, params, k, r)
        if best is None or r > best[0]:
            best = (r, params)
        if r >= target_recall:
            break
    recall, params = best if best is not None else (1.0, {})
    reached = recall >= target_recall
    if not reached:
        log.warning("tune %s: recall@%d target %.3f not reached; best %.4f with %s (a bigger build, e.g. "
                    "larger M or nlist, or the exact backend, may be needed)", index.kind, k, target_recall, recall, params)
    index.search_defaults = {**index.search_defaults, **params}
    result = {"params": params, "recall": round(recall, 6), "k": k, "target": target_recall, "queries": len(q),
              "reached": reached}
    index.tuning = result
    return result

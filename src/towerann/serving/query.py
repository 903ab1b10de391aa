"""A caller's vector, checked before it reaches an index: `query_vector` on POST /v1/candidates, and an
item's `vector` on POST /v1/items to a vectors-only bundle (freshness.live)."""

from __future__ import annotations

from typing import Any

import numpy as np

from towerann.errors import BadRequest


def check_vector(value: Any, dim: int, what: str = "query_vector") -> np.ndarray:
    """-> float32 [dim]; BadRequest (naming `what`) unless `value` is a list of `dim` finite numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise BadRequest(f"{what} must be a list of {dim} numbers, got {type(value).__name__}")
    if len(value) != dim:
        raise BadRequest(f"{what} has {len(value)} numbers; the served index has dim {dim}")
    if not all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in value):
        raise BadRequest(f"{what} must hold numbers only")
    try:
        q = np.asarray(value, dtype=np.float32)
    except OverflowError:  # an integer too big for a float
        q = np.full(dim, np.inf, np.float32)
    bad = np.flatnonzero(~np.isfinite(q))
    if len(bad):
        raise BadRequest(f"{what} holds a NaN or infinite value (or one beyond float32) at position {int(bad[0])}")
    return q


def check_query_vector(value: Any, dim: int) -> np.ndarray:
    """-> float32 [dim]; BadRequest unless `value` is a list of `dim` finite numbers."""
    return check_vector(value, dim, "query_vector")

"""A caller's query vector (`query_vector` on POST /v1/candidates), checked before it reaches an index."""

from __future__ import annotations

from typing import Any

import numpy as np

from towerann.errors import BadRequest


def check_query_vector(value: Any, dim: int) -> np.ndarray:
    """-> float32 [dim]; BadRequest unless `value` is a list of `dim` finite numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise BadRequest(f"query_vector must be a list of {dim} numbers, got {type(value).__name__}")
    if len(value) != dim:
        raise BadRequest(f"query_vector has {len(value)} numbers; the served index has dim {dim}")
    if not all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in value):
        raise BadRequest("query_vector must hold numbers only")
    try:
        q = np.asarray(value, dtype=np.float32)
    except OverflowError:  # an integer too big for a float
        q = np.full(dim, np.inf, np.float32)
    bad = np.flatnonzero(~np.isfinite(q))
    if len(bad):
        raise BadRequest(
            f"query_vector holds a NaN or infinite value (or one beyond float32) at position {int(bad[0])}"
        )
    return q

"""Recall of found ids against true ids: the one definition tuning, filter calibration and checks use."""

from __future__ import annotations

import numpy as np


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth| (padding -1 ignored; rows with no truth skipped)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        total += len(t)
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=True))
    return hits / total if total else 1.0


def recall_standard_error(found: np.ndarray, truth: np.ndarray) -> float:
    """Standard error of the mean recall over the query rows (rows with no truth skipped)."""
    per_query = [
        len(np.intersect1d(f[f >= 0], t[t >= 0])) / (t >= 0).sum() for f, t in zip(found, truth) if (t >= 0).any()
    ]
    return float(np.std(per_query, ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0

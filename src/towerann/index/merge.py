"""Top-k by score, and merging of per-source top-k lists (higher score is better: metric "ip").

Used by every backend (exact scoring, fallbacks) and by the ScaNN delta tier.
faiss' own merge helpers assume "smaller is better" unless told otherwise; these never do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PAD_ID = -1
PAD_SCORE = -np.inf


def padded(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """An all-padding result block: ids -1, scores -inf."""
    return np.full((m, k), PAD_ID, np.int64), np.full((m, k), PAD_SCORE, np.float32)


# Query x item scores of one brute-force block (256 MB of float32): hundreds of queries over 10M
# items at once would take tens of GB (a tuning or calibration run's ground truth).
EXACT_BLOCK_SCORES = 1 << 26


def topk_blocked(
    q: np.ndarray, k: int, score: Callable[[np.ndarray], np.ndarray], n_cols: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """topk_rows(score(q), k, labels), scoring a block of query rows at a time so that a block holds
    at most EXACT_BLOCK_SCORES scores (`score` maps query rows to their [rows, n_cols] scores)."""
    step = max(1, EXACT_BLOCK_SCORES // max(n_cols, 1))
    if len(q) <= step:
        return topk_rows(score(q), k, labels=labels)
    parts = [topk_rows(score(q[i : i + step]), k, labels=labels) for i in range(0, len(q), step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def topk_rows(scores: np.ndarray, k: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of `scores` [m, n], sorted by score descending.

    Returns (labels or column indices int64 [m, k], scores float32 [m, k]); rows with fewer than k
    finite scores are padded with -1/-inf (a -inf score marks an excluded column).
    """
    scores = np.asarray(scores, dtype=np.float32)
    m, n = scores.shape
    out_ids, out_scores = padded(m, k)
    if n == 0 or k == 0:
        return out_ids, out_scores
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(n), (m, n))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    cols = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(part_scores, order, axis=1)
    ids = cols.astype(np.int64) if labels is None else np.asarray(labels, np.int64)[cols]
    ids[~np.isfinite(top) | np.isnan(top)] = PAD_ID
    top = np.where(ids == PAD_ID, PAD_SCORE, top).astype(np.float32)
    out_ids[:, :kk] = ids
    out_scores[:, :kk] = top
    return out_ids, out_scores


def merge_topk(ids: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-source top lists ([m, k_i] each, -1/-inf padded) into one top-k list per row.

    Sources must hold disjoint ids (an id in two sources would appear twice); padding is ignored.
    """
    if not ids:
        raise ValueError("merge_topk needs at least one source")
    all_ids = np.concatenate([np.asarray(i, np.int64) for i in ids], axis=1)
    all_scores = np.concatenate([np.asarray(s, np.float32) for s in scores], axis=1)
    all_scores = np.where(all_ids == PAD_ID, PAD_SCORE, all_scores)
    cols, top = topk_rows(all_scores, k)
    out = np.where(cols == PAD_ID, PAD_ID, np.take_along_axis(all_ids, np.maximum(cols, 0), axis=1))
    return out.astype(np.int64), top

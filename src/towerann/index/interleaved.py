"""Timings that hold on a busy machine: the contenders of a decision timed in turns, the median kept.

A tuner sweep times each setting once, one after the other; on a shared 2-core machine a burst of
someone else's work during one setting's turn makes it look slower than a setting timed a moment
later (one exact search over 20k items took 0.11 or 8 ms). When the contenders of a decision (the
settings near the best, exact search as the baseline; two `auto` candidates) are timed in rounds,
each round timing every contender once on the same queries, a burst lands on all of them alike:
the decision keeps the first contender unless another is faster by FASTER_BY, as the median over
rounds of their paired ratio (steady_winner).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

ROUNDS = 5  # rounds of turns; the median over them is kept
# Settings whose sweep p50 is within this factor of the best one are contenders, timed again in turns
# (a setting further off is not turned around by a burst that a median over its queries survived).
CONTENDER_RATIO = 1.5
# A contender replaces the one kept only when it is faster by this share, paired round by round: the
# host's speed drifts (one HNSW setting's median over 200 queries: 0.14-0.24 ms from one run to the
# next on this 2-core machine, with 0-2 busy processes beside it, CPU time alike), so two settings a
# few percent apart swap places between rounds; on lower medians alone two builds of one 30k catalog
# tuned ScaNN to 12 and 24 leaves (a CI run). Within a round the two are timed back to back, and the
# ratio of those times drifts far less.
FASTER_BY = 0.05

# (kind, params, search): what index.tune's Timer is called with, less the queries
Contender = tuple[str, "dict[str, Any] | None", Callable[[np.ndarray], Any]]


def timed_in_turns(
    contenders: list[Contender], queries: np.ndarray, timer: Callable[..., float], rounds: int = ROUNDS
) -> np.ndarray:
    """Each contender's p50 (ms) in each of `rounds` rounds, [rounds, contenders], the contenders timed in
    turns on the same queries.

    `timer` is index.tune's Timer. Each round starts with a different contender, so none is always timed
    first (caches, clock ramp)."""
    per_round = np.empty((rounds, len(contenders)))
    for r in range(rounds):
        for j in range(len(contenders)):
            i = (r + j) % len(contenders)
            kind, params, search = contenders[i]
            per_round[r, i] = timer(kind, params, search, queries)
    return per_round


def medians(per_round: np.ndarray) -> list[float]:
    return [float(x) for x in np.median(per_round, axis=0)]


def steady_winner(per_round: np.ndarray) -> int:
    """The column of `per_round` ([rounds, contenders] ms) a decision keeps: the first contender (the one
    already kept, or the least work) unless a later one is faster by FASTER_BY, as the median over rounds
    of its time over the kept one's in the same round; then that one (and so on along the columns)."""
    kept = 0
    for j in range(1, per_round.shape[1]):
        if float(np.median(per_round[:, j] / per_round[:, kept])) < 1.0 - FASTER_BY:
            kept = j
    return kept

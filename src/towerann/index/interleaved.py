"""Timings that hold on a busy machine: the contenders of a decision timed in turns, the median kept.

A tuner sweep times each setting once, one after the other; on a shared 2-core machine a burst of
someone else's work during one setting's turn makes it look slower than a setting timed a moment
later (one exact search over 20k items took 0.11 or 8 ms). When the contenders of a decision (the
settings near the best, exact search as the baseline; two `auto` candidates) are timed in rounds,
each round timing every contender once on the same queries, a burst lands on all of them alike,
and the median over rounds is what the decision uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

ROUNDS = 5  # rounds of turns; the median over them is kept
# Settings whose sweep p50 is within this factor of the best one are contenders, timed again in turns
# (a setting further off is not turned around by a burst that a median over its queries survived).
CONTENDER_RATIO = 1.5

# (kind, params, search): what index.tune's Timer is called with, less the queries
Contender = tuple[str, "dict[str, Any] | None", Callable[[np.ndarray], Any]]


def in_turns(
    contenders: list[Contender], queries: np.ndarray, timer: Callable[..., float], rounds: int = ROUNDS
) -> list[float]:
    """Median over `rounds` of each contender's p50 (ms), the contenders timed in turns on the same queries.

    `timer` is index.tune's Timer. Each round starts with a different contender, so none is always timed
    first (caches, clock ramp)."""
    per_round = np.empty((rounds, len(contenders)))
    for r in range(rounds):
        for j in range(len(contenders)):
            i = (r + j) % len(contenders)
            kind, params, search = contenders[i]
            per_round[r, i] = timer(kind, params, search, queries)
    return [float(x) for x in np.median(per_round, axis=0)]

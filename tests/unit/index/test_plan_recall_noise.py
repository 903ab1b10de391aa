"""The filter plan keeps a library path whose recall is within measurement noise of the floor.

Found at 1M items: an HNSW tuned to recall 0.9 measured 0.869 on a mask keeping 95% of the catalog, against
a floor of 0.87 (its unfiltered recall less the slack), so the plan sent every availability-masked request
to brute force - 40 ms instead of 0.4. A path now misses the floor only when it is measurably below it."""

from __future__ import annotations

import numpy as np

from towerann.index.filter_plan import RECALL_SE_TOLERANCE, derive, recall_standard_error


def _points(recall: float, se: float | None) -> list[dict]:
    post = {"share": 0.95, "path": "post", "recall": recall, "p50_ms": 0.4, "k": 100}
    if se is not None:
        post["recall_se"] = se
    return [{"share": 0.95, "path": "exact", "recall": 1.0, "recall_se": 0.0, "p50_ms": 40.0, "k": 100}, post]


def test_a_path_within_noise_of_the_floor_keeps_its_share() -> None:
    assert derive(_points(0.869, 0.006), 100, 0.87) == [[100, 1.0, "post"]]


def test_a_path_measurably_below_the_floor_goes_exact() -> None:
    se = 0.006
    below = 0.87 - RECALL_SE_TOLERANCE * se - 0.001
    assert derive(_points(below, se), 100, 0.87) == [[100, 1.0, "exact"]]
    assert derive(_points(0.869, None), 100, 0.87) == [[100, 1.0, "exact"]]  # no error stored: the plain rule


def test_recall_standard_error_is_the_spread_of_per_query_recall() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, -1, -1], [-1, -1, -1, -1]])
    found = np.array([[1, 2, 3, 4], [5, 6, 0, 0], [9, 0, -1, -1], [1, 2, 3, 4]])
    per_query = [1.0, 0.5, 0.5]  # the row with no truth is skipped
    assert np.isclose(recall_standard_error(found, truth), np.std(per_query, ddof=1) / np.sqrt(3))
    assert recall_standard_error(truth[:2], truth[:2]) == 0.0

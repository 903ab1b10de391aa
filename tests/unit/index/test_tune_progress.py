"""The tuner's progress bar: closed when the sweep ends, saying why when it stopped before the last setting
(a bar left at `tune hnsw: 44% 4/9` looks like a failure)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from tqdm import tqdm

import towerann.index.tune as tune_module
from towerann.index.protocol import SearchResult
from towerann.index.tune import tune

DIM, K = 4, 3


class FakeIndex:
    """An index whose every setting finds the exact answer; the timer makes setting i cost 2**i ms."""

    kind = "fake"
    dim = DIM
    n_slots = 50

    def __init__(self, settings: int) -> None:
        self.settings = settings
        self.search_defaults: dict[str, Any] = {}
        self.tuning: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.n_slots

    def search_space(self, k: int) -> list[dict[str, Any]]:
        return [{"effort": i} for i in range(self.settings)]

    def exact_search(self, q: np.ndarray, k: int) -> SearchResult:
        ids = np.tile(np.arange(k, dtype=np.int64), (len(q), 1))
        return SearchResult(ids, np.zeros(ids.shape, np.float32))

    def search(self, q: np.ndarray, k: int, params: dict[str, Any] | None = None) -> SearchResult:
        return self.exact_search(q, k)


def doubling(kind: str, params: dict[str, Any] | None, search: Any, queries: np.ndarray) -> float:
    return 1e6 if params is None else 2.0 ** params["effort"]


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tqdm, io.StringIO]]:
    """Every bar the tuner opens, drawn into a buffer as if on a terminal."""
    made: list[tuple[tqdm, io.StringIO]] = []

    def visible(*args: Any, **kwargs: Any) -> tqdm:
        out = io.StringIO()
        bar = tqdm(*args, **{**kwargs, "disable": False, "file": out, "mininterval": 0})
        made.append((bar, out))
        return bar

    monkeypatch.setattr(tune_module, "tqdm", visible)
    return made


def test_a_sweep_that_stops_early_closes_its_bar_saying_why(bars) -> None:
    queries = np.random.default_rng(0).standard_normal((8, DIM))
    result = tune(FakeIndex(9), queries, K, 0.95, timer=doubling)
    # setting 0 reaches the target at 1 ms; setting 1 (2 ms) is not over twice that, setting 2 (4 ms) is
    assert result["params"] == {"effort": 0} and len(result["curve"]) == 3
    ((bar, out),) = bars
    assert bar.disable  # closed (tqdm disables a bar it has closed)
    last = out.getvalue().split("\r")[-1]
    assert "3/9" in last and "stopped: recall 1.000 >= 0.95 reached" in last, last


def test_a_full_sweep_closes_at_its_end_with_no_stop_reason(bars) -> None:
    queries = np.random.default_rng(0).standard_normal((8, DIM))
    flat = lambda kind, params, search, queries: 1e6 if params is None else 1.0  # noqa: E731
    tune(FakeIndex(4), queries, K, 0.95, timer=flat)
    ((bar, out),) = bars
    last = out.getvalue().split("\r")[-1]
    assert bar.disable and "4/4" in last and "stopped" not in last, last

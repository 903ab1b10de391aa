"""Tuning: the cheapest setting reaching the target, measured on query vectors; auto picks the backend."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from towerann.errors import BadRequest
from towerann.index import create
from towerann.index.build import AUTO_EXACT_ITEMS, Tuning, build_index
from towerann.index.tune import recall_at_k, tune

D, N = 32, 6000


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((30, D))
    v = centers[rng.integers(0, 30, N)] + 0.5 * rng.standard_normal((N, D))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    q = centers[rng.integers(0, 30, 60)] + centers[rng.integers(0, 30, 60)] + rng.standard_normal((60, D))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return v, np.arange(N, dtype=np.int64), q


def test_recall_at_k_counts_overlap_and_ignores_padding():
    found = np.array([[1, 2, 3, -1], [5, 6, 7, 8]])
    truth = np.array([[1, 2, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(found, truth) == pytest.approx((2 + 4) / (3 + 4))


def test_tune_picks_the_cheapest_setting_reaching_target(data):
    v, ids, q = data
    ix = create("hnsw", D, M=8, ef_construction=32)
    ix.build(v, ids)
    result = tune(ix, q, 100, 0.99)
    assert result["reached"] and result["recall"] >= 0.99 and result["k"] == 100 and result["queries"] == 60
    assert ix.search_defaults["ef"] == result["params"]["ef"] and ix.tuning == result
    truth = ix.exact_search(q, 100).ids
    assert recall_at_k(ix.search(q, 100).ids, truth) == pytest.approx(result["recall"], abs=1e-5)  # defaults now tuned
    space = ix.search_space(100)
    chosen = space.index(result["params"])
    if chosen > 0:  # the setting before it was measured and fell short
        assert recall_at_k(ix.search(q, 100, params=space[chosen - 1]).ids, truth) < 0.99


def test_unreachable_target_returns_best_and_warns(data, caplog):
    v, ids, q = data
    ix = create("hnsw", D, M=2, ef_construction=4)  # a graph too sparse to ever find everything
    ix.build(v, ids)
    with caplog.at_level(logging.WARNING, logger="towerann.index.tune"):
        result = tune(ix, q, 100, 1.0)
    assert result["reached"] is False and result["recall"] < 1.0
    assert "not reached" in caplog.text
    assert ix.search_defaults["ef"] == result["params"]["ef"]
    truth = ix.exact_search(q, 100).ids
    best = max(recall_at_k(ix.search(q, 100, params=p).ids, truth) for p in ix.search_space(100))
    assert result["recall"] == pytest.approx(best, abs=1e-5)


def test_tune_rejects_bad_target(data):
    v, ids, q = data
    ix = create("exact", D)
    ix.build(v[:100], ids[:100])
    with pytest.raises(BadRequest, match="target recall"):
        tune(ix, q, 10, 1.5)
    assert tune(ix, q, 10, 0.9)["recall"] == 1.0


def test_build_auto_picks_exact_for_small_and_tuned_hnsw_for_large(data):
    v, ids, q = data
    assert N < AUTO_EXACT_ITEMS
    small = build_index(v, ids, kind="auto", params={"M": 8}, tuning=Tuning(q, 50, 0.95))  # M: not for exact
    assert small.kind == "exact" and small.tuning["recall"] == 1.0
    big = build_index(v, ids, kind="auto", params={"M": 8, "ef_construction": 32}, tuning=Tuning(q, 50, 0.95),
                      auto_exact_items=1000)
    assert big.kind == "hnsw" and big.tuning["reached"] and len(big) == N
    assert big.build_params == {"M": 8, "ef_construction": 32}
    assert recall_at_k(big.search(q, 50).ids, small.search(q, 50).ids) >= 0.95

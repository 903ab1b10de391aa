"""The hnsw backend's own paths: catalog stored in locality order, masks applied after an unbounded
beam (most slots kept) or inside the walk (few kept), huge pages. The contract suite checks results
in general; these pin the parts a one-line slip in hnsw.py would break without it noticing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from towerann.errors import DataError
from towerann.index import Filter, create
from towerann.index.hnsw import LOCALITY_MIN, huge_pages

D = 16
N = LOCALITY_MIN + 2000  # big enough for build() to reorder the catalog


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    centers = _norm(rng.standard_normal((20, D)))
    vectors = _norm(centers[rng.integers(0, 20, N)] + 0.3 * rng.standard_normal((N, D)))
    return {
        "vectors": vectors,
        "ids": rng.permutation(5 * N)[:N].astype(np.int64) + 7,
        "categories": rng.integers(0, 4, N).astype(np.int32),
        "available": rng.random(N) > 0.2,
        "queries": _norm(rng.standard_normal((20, D))),
    }


@pytest.fixture(scope="module")
def built(catalog):
    ix = create("hnsw", D, M=8, ef_construction=40)
    ix.build(catalog["vectors"], catalog["ids"], catalog["categories"], catalog["available"])
    return ix


def _truth(catalog, keep: np.ndarray, k: int) -> np.ndarray:
    scores = catalog["queries"] @ catalog["vectors"].T
    scores[:, ~keep] = -np.inf
    return catalog["ids"][np.argsort(-scores, axis=1)[:, :k]]


def test_reordered_build_keeps_each_items_vector_category_and_availability(built, catalog):
    assert not np.array_equal(built.slot_ids, catalog["ids"]), "the catalog was not stored in locality order"
    k = 50
    for cats in (None, frozenset({1, 2})):  # availability alone (post-filtered), and with a category filter
        keep = (
            catalog["available"] if cats is None else catalog["available"] & np.isin(catalog["categories"], list(cats))
        )
        res = built.search(
            catalog["queries"], k, filter=Filter(cats) if cats else None, params={"ef": 200, "exact_below": 0}
        )
        assert res.exact_rows == 0
        allowed = set(catalog["ids"][keep].tolist())
        assert set(res.ids.ravel().tolist()) <= allowed, "returned an unavailable or filtered-out item"
        pos = {int(i): p for p, i in enumerate(catalog["ids"])}
        got = catalog["vectors"][[pos[int(i)] for i in res.ids[0]]]
        np.testing.assert_allclose(res.scores[0], got @ catalog["queries"][0], atol=1e-5)  # vectors follow ids
        hits = np.mean([len(set(a) & set(b)) / k for a, b in zip(res.ids.tolist(), _truth(catalog, keep, k).tolist())])
        assert hits > 0.9, f"recall {hits:.3f} with categories {cats}"


def test_post_filter_rows_left_short_redo_the_search_with_the_selector(catalog):
    ix = create("hnsw", D, M=8, ef_construction=40)
    ix.build(catalog["vectors"], catalog["ids"], catalog["categories"])
    q = catalog["queries"][:5]
    k = 30
    # hide every query's 300 nearest items: 88% of the slots still qualify (the post-filter path),
    # but an unbounded beam of ef=k around the query holds almost none of them
    near = np.unique(np.argsort(-(q @ catalog["vectors"].T), axis=1)[:, :300])
    ix.set_available(catalog["ids"][near], False)
    res = ix.search(q, k, params={"ef": k, "exact_below": 0})
    assert res.exact_rows == 0, "the library (selector search) must fill the rows, not brute force"
    assert (res.ids >= 0).all() and not np.isin(res.ids, catalog["ids"][near]).any()
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()
    assert all(len(set(row)) == k for row in res.ids.tolist())


def test_a_reordered_build_still_refuses_bad_tables(catalog):
    ix = create("hnsw", D, M=8, ef_construction=40)
    with pytest.raises(DataError, match="ids"):
        ix.build(catalog["vectors"], catalog["ids"][:-1])
    with pytest.raises(DataError, match="duplicate"):
        ix.build(catalog["vectors"], np.zeros(N, np.int64))
    assert ix.n_slots == 0


def test_huge_pages_leave_the_buffer_intact():
    buf = np.arange(3 << 20, dtype=np.int32)  # 12 MB: holds whole 2 MB pages
    done = huge_pages(buf, collapse=True)
    assert done % (2 << 20) == 0 and done <= buf.nbytes
    assert np.array_equal(buf, np.arange(3 << 20, dtype=np.int32))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform == "linux" and thp.exists() and "[never]" not in thp.read_text():
        assert huge_pages(buf, collapse=False) >= 4 << 20  # the advice was really given, over the aligned middle


def test_the_walk_inside_a_mask_searches_at_the_ef_asked_for(catalog):
    """The selector walk (a narrow mask) runs at the beam it is given: a wider ef finds clearly more of the
    qualifying items' true top k. If the masked walk dropped its efSearch, faiss would walk at max(16, k)
    whatever the ef, and the two recalls would be the same."""
    ix = create("hnsw", D, M=4, ef_construction=16)  # a sparse graph, so that the beam matters
    ix.build(catalog["vectors"], catalog["ids"], catalog["categories"])
    k = 20
    keep = np.isin(catalog["categories"], [1])
    truth = _truth(catalog, keep, k)

    def recall(ef: int) -> float:
        params = {"ef": ef, "exact_below": 0, "filter_path": "filtered"}
        found = ix.search(catalog["queries"], k, filter=Filter(frozenset({1})), params=params).ids
        return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))

    narrow, wide = recall(k), recall(16 * k)
    assert wide > narrow + 0.05, (narrow, wide)

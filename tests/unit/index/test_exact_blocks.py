"""Brute force in query blocks (index.merge.topk_blocked): the answer must not depend on the block size.

Ground truth for tuning and filter calibration scores hundreds of queries against the whole catalog;
at 10M items one block would take tens of GB, so it is split. These tests shrink the block to a few
query rows and check every brute-force path (unmasked, most slots kept, a few slots kept; the
in-memory backends and IVF-PQ's tiers) against one unsplit block.
"""

from __future__ import annotations

import numpy as np
import pytest

from towerann.index import Filter, create, merge

D, N = 16, 3000


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((N, D)).astype(np.float32)
    cats = (np.arange(N) % 10).astype(np.int32)
    queries = rng.standard_normal((37, D)).astype(np.float32)  # 37: blocks of 4 leave a ragged last one
    return vecs, cats, queries


@pytest.mark.parametrize("kind", ["exact", "ivfpq"])
@pytest.mark.parametrize("categories", [None, set(range(7)), {3}], ids=["unmasked", "most", "few"])
def test_blocked_brute_force_equals_one_block(catalog, kind, categories, monkeypatch):
    vecs, cats, queries = catalog
    ix = create(kind, D, **({"nlist": 16} if kind == "ivfpq" else {}))
    ix.build(vecs, np.arange(N) + 1000, cats)
    if kind == "ivfpq":
        ix.add(vecs[:50] * 0.5, np.arange(50) + 10_000, cats[:50])  # a second tier (fresh items)
    f = None if categories is None else Filter(categories=frozenset(categories))
    whole = ix.exact_search(queries, 25, f)
    monkeypatch.setattr(merge, "EXACT_BLOCK_SCORES", 4 * N)  # a few query rows per block
    split = ix.exact_search(queries, 25, f)
    np.testing.assert_array_equal(split.ids, whole.ids)
    np.testing.assert_allclose(split.scores, whole.scores, rtol=1e-6)
    assert split.ids.shape == (len(queries), 25) and (split.ids >= 0).all()
    if categories is not None:
        code = {i: c for i, c in zip(np.arange(N) + 1000, cats)} | {10_000 + i: cats[i] for i in range(50)}
        assert {code[i] for i in split.ids.ravel()} <= categories


def test_a_block_never_exceeds_the_budget(monkeypatch):
    seen = []

    def score(b):
        seen.append(len(b))
        return np.zeros((len(b), 100), np.float32)

    monkeypatch.setattr(merge, "EXACT_BLOCK_SCORES", 350)
    ids, _ = merge.topk_blocked(np.zeros((10, 4), np.float32), 5, score, 100)
    assert seen == [3, 3, 3, 1] and ids.shape == (10, 5)

"""An ivfpq built in memory and then added to searches its added rows exactly too: brute force (exact_search,
and the exact path a search takes when few items qualify or the catalog is too small to train) scores every
row the index holds. Its in-memory rows outgrow the array the build started from, and exact search read
that array: the added items were never found (a property test drew it at random: 2 items, the first hidden).
"""

from __future__ import annotations

import numpy as np
import pytest

from towerann.index import create


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("built", [1, 300])  # untrained (brute force only), and past the training minimum
def test_rows_added_after_an_in_memory_build_are_found_by_exact_search(built: int) -> None:
    rng = np.random.default_rng(3)
    dim, added = 16, 5
    vectors = _unit(rng, built + added, dim)
    ids = np.arange(100, 100 + built + added, dtype=np.int64)
    cats = np.zeros(built + added, np.int32)
    index = create("ivfpq", dim)
    index.build(vectors[:built], ids[:built], cats[:built], np.ones(built, bool))
    index.add(vectors[built:], ids[built:], cats[built:], np.ones(added, bool))
    index.set_available([int(ids[0])], False)  # a mask: the searches below go through the exact path's filter
    queries = vectors[built:]
    for result in (index.exact_search(queries, 1), index.search(queries, 1)):
        assert result.ids[:, 0].tolist() == ids[built:].tolist()  # each added row is its own nearest

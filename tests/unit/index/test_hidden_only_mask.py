"""A mask with no filter (removed or hidden items only) takes the unfiltered search, not the filter plan.

Found at 1M items: an ivfpq bundle's calibrated plan said exact from 3% of the catalog kept up (category
masks, which follow the vectors' clusters, cost its tight nprobe 8 / re-rank 200 recall), and once the
freshness bench's bulk writes had hidden a few items, every unfiltered request took that row: brute
force over 1M items, 45 ms against 0.23. Hidden items are scattered with respect to a query, so the
library's path with the hidden slots dropped keeps the unfiltered recall.

Each ANN backend gets a plan that sends every filtered search exact (the worst a calibration can
store). Hiding a few random items must leave unfiltered searches on the library path (no exact
rows), never return a hidden item, and keep recall near the unmasked search's; a filter, or a mask
hiding most of the catalog, still follows the plan.
"""

from __future__ import annotations

import numpy as np
import pytest

from towerann.index import Filter, create
from towerann.index.path_choice import HIDDEN_ONLY_SHARE
from towerann.index.tune import recall_at_k

D, N, K = 16, 12_000, 20
ALL_EXACT = [[K, 1.0, "exact"]]
BUILD = {"hnsw": {"M": 8, "ef_construction": 40}, "ivfpq": {"pq_m": 8}, "scann": {}}


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    centers = _norm(rng.standard_normal((30, D)))
    assign = rng.integers(0, 30, N)
    return {
        "vectors": _norm(centers[assign] + 0.3 * rng.standard_normal((N, D))),
        "ids": np.arange(N, dtype=np.int64) * 3 + 5,
        "categories": (assign % 10).astype(np.int32),
        "queries": _norm(centers[rng.integers(0, 30, 40)] + 0.3 * rng.standard_normal((40, D))),
        "hidden": rng.choice(N, N // 100, replace=False),
    }


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_hidden_items_keep_the_unfiltered_path(kind: str, catalog: dict[str, np.ndarray]) -> None:
    ix = create(kind, D, **BUILD[kind])
    ix.build(catalog["vectors"], catalog["ids"], catalog["categories"])
    ix.search_defaults.update(filter_plan=ALL_EXACT, exact_below=0)
    q = catalog["queries"]
    before = recall_at_k(ix.search(q, K).ids, ix.exact_search(q, K).ids)

    hidden = catalog["ids"][catalog["hidden"]]
    ix.set_available(hidden, False)
    res = ix.search(q, K)
    assert res.exact_rows == 0, f"{kind}: a mask hiding 1% of the items went brute force"
    assert not np.isin(res.ids, hidden).any()
    assert recall_at_k(res.ids, ix.exact_search(q, K).ids) >= before - 0.05

    broad = Filter(categories=frozenset(range(9)))  # a filter keeping 90%: the plan decides
    assert ix.search(q, K, filter=broad).exact_rows == len(q)

    most = catalog["ids"][: int(N * (1 - HIDDEN_ONLY_SHARE)) + 100]
    ix.remove(most)  # fewer than HIDDEN_ONLY_SHARE of the slots left: the plan again
    res = ix.search(q, K)
    assert res.exact_rows == len(q)
    assert not np.isin(res.ids, most).any()

"""base.top_inner_products (the ScaNN delta tier's unfiltered search): the k best rows by inner product,
labelled from first_label, best first, -1/-inf padded - the same answer as scoring every row and sorting."""

from __future__ import annotations

import numpy as np
import pytest

from towerann.index.base import inner_products, top_inner_products
from towerann.index.merge import topk_rows


@pytest.mark.parametrize("m", [1, 3, 25])  # one query (the serving path), a few, and faiss' BLAS path
def test_the_same_answer_as_scoring_every_row(m: int) -> None:
    rng = np.random.default_rng(m)
    vecs = rng.standard_normal((5000, 24)).astype(np.float32)
    q = rng.standard_normal((m, 24)).astype(np.float32)
    ids, scores = top_inner_products(q, vecs, 50, first_label=1_000_000)
    want_ids, want_scores = topk_rows(inner_products(q, vecs), 50, labels=np.arange(1_000_000, 1_005_000))
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_fewer_rows_than_k_are_padded() -> None:
    vecs = np.eye(3, 4, dtype=np.float32)
    ids, scores = top_inner_products(np.array([[0.0, 2.0, 1.0, 0.0]], np.float32), vecs, 5, first_label=7)
    assert ids.tolist() == [[8, 9, 7, -1, -1]]
    assert scores[0, :3].tolist() == [2.0, 1.0, 0.0] and np.isneginf(scores[0, 3:]).all()
    empty_ids, empty_scores = top_inner_products(np.zeros((2, 4), np.float32), vecs[:0], 3)
    assert (empty_ids == -1).all() and np.isneginf(empty_scores).all()

"""RetrievalBundle owns its changes: each one all-or-nothing, the index first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.errors import BadRequest
from towerann.freshness.live import check_rows, embed_rows
from towerann.freshness.publish import publish_bundle
from towerann.serving.bundle import RetrievalBundle


@pytest.fixture(params=["exact", "hnsw"])
def bundle(request: pytest.FixtureRequest, serving_bundle: dict[str, Path], tmp_path: Path) -> RetrievalBundle:
    return RetrievalBundle.load(
        publish_bundle(tmp_path / "root", serving_bundle["model"], serving_bundle["vectors"], kind=request.param)
    )


def _rows(bundle: RetrievalBundle, ids: list[str], category: str) -> list[dict]:
    numeric, categorical = bundle.model.schema.item_feature_names()
    return check_rows(
        bundle,
        [
            {"item_id": i, "category": category, **{n: 1.0 for n in numeric}, **{c: "x" for c in categorical}}
            for i in ids
        ],
    )


def _state(b: RetrievalBundle) -> tuple:
    q = np.random.default_rng(0).standard_normal((4, b.index.dim)).astype(np.float32)
    return (
        len(b.external_ids),
        np.asarray(b.external_ids).tobytes(),
        np.asarray(b.item_model_cat).tobytes(),
        list(b.category_names),
        dict(b.category_code),
        len(b.item_internal),
        len(b.index),
        b.index.n_slots,
        b.delta_seq,
        b.index.search(q, 20).ids.tobytes(),
    )


def test_a_failing_add_leaves_the_bundle_as_it_was(bundle: RetrievalBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(bundle, ["990001", "1"], "a-new-category")  # one new item, one replaced, a new category
    vectors = embed_rows(bundle, rows)
    before = _state(bundle)

    with pytest.raises(BadRequest):  # vectors of the wrong width: the index refuses them
        bundle.upsert(rows, vectors[:, :-1], seq=7)
    assert _state(bundle) == before

    def library_fails(*args, **kwargs):  # the ANN library itself fails mid-write
        raise RuntimeError("faiss: out of memory")

    monkeypatch.setattr(bundle.index, "_add_vectors", library_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        bundle.upsert(rows, vectors, seq=7)
    assert _state(bundle) == before
    assert bundle.item_internal.get("990001") is None and "a-new-category" not in bundle.category_code
    monkeypatch.undo()

    bundle.upsert(rows, vectors, seq=7)  # the same write, once the library takes it, lands whole
    new = bundle.item_internal.get("990001")
    assert new == before[0] and bundle.external_ids[new] == 990001 and bundle.delta_seq == 7
    assert bundle.category_names[-1] == "a-new-category"
    found = bundle.index.search(vectors[:1], 1).ids[0, 0]
    assert found == new  # the new item is its own nearest neighbour


def test_availability_and_removal_change_only_what_they_name(bundle: RetrievalBundle) -> None:
    iid = bundle.item_internal.get("5")
    assert iid is not None
    assert bundle.set_available("5", False, seq=3) and bundle.delta_seq == 3
    assert not bundle.set_available("no-such-item", False)
    q = np.asarray(bundle.index.exact_search(np.eye(1, bundle.index.dim, dtype=np.float32), 2000).ids)
    assert iid not in q
    assert bundle.set_available("5", True) and bundle.remove("5", seq=4)
    assert iid not in bundle.index and bundle.delta_seq == 4 and not bundle.remove("5")

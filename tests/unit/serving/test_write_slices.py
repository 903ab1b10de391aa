"""A live upsert reaches the served index a slice at a time (freshness.live.SLICE_S), each slice a whole
change of its own, so searches run between two slices instead of waiting for the whole batch; and a
bundle's id tables grow into room kept for them instead of being copied on every write."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from towerann.freshness.deltalog import open_delta_log
from towerann.freshness.live import FIRST_SLICE, ItemWriter, check_rows, embed_rows
from towerann.freshness.publish import publish_bundle
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.item_tables import appended


def _rows(bundle: RetrievalBundle, ids: list[str]) -> list[dict]:
    numeric, categorical = bundle.model.schema.item_feature_names()
    return [
        {"item_id": i, "category": "cat_1", **{n: float(j % 7) for n in numeric}, **{c: "x" for c in categorical}}
        for j, i in enumerate(ids)
    ]


def test_a_large_upsert_is_applied_in_slices_each_one_whole(serving_bundle: dict[str, Path], tmp_path: Path) -> None:
    b = RetrievalBundle.load(
        publish_bundle(tmp_path / "root", serving_bundle["model"], serving_bundle["vectors"], kind="hnsw")
    )
    writer = ItemWriter(BundleHolder(b), open_delta_log("embedded", tmp_path / "delta.sqlite"))
    n0, ids = len(b.index), [str(990_000 + j) for j in range(300)]
    seen: list[tuple[int, int, int]] = []  # after each change: items in the index, ids known, delta_seq

    def apply_on(change) -> None:  # type: ignore[no-untyped-def]
        change()
        held = sum(b.holds(i) for i in ids)
        seen.append((len(b.index) - n0, held, b.delta_seq))

    out = writer.upsert(_rows(b, ids), apply_on=apply_on)
    assert out["upserted"] == 300 and len(seen) >= 2 and seen[0][0] == FIRST_SLICE
    added = [s[0] for s in seen]
    assert added == sorted(set(added)) and added[-1] == 300  # each slice adds rows, none twice
    assert all(index_rows == held for index_rows, held, _ in seen)  # index and id map in step after each slice
    seqs = [s[2] for s in seen]
    assert seqs == sorted(set(seqs)) and seqs[-1] == out["seq"]  # the cut-off follows each slice's last row
    vectors = embed_rows(b, check_rows(b, _rows(b, ids[:30])))
    res = b.index.search(vectors, 1)
    new = set(ids)
    assert np.mean([str(b.external_ids[i]) in new for i in res.ids[:, 0]]) >= 0.9  # searchable, as new items
    assert np.isclose(res.scores[:, 0], (vectors * vectors).sum(1), atol=1e-4).mean() >= 0.9  # its own vector


def test_appended_grows_its_own_buffer_in_place_and_never_writes_past_a_foreign_front() -> None:
    first, buffer = appended(np.arange(3, dtype=np.int64), np.array([3]), None)
    second, again = appended(first, np.array([4, 5]), buffer)
    assert again is buffer and second.tolist() == [0, 1, 2, 3, 4, 5]  # in place: no copy of the front
    assert first.tolist() == [0, 1, 2, 3]  # a view taken before still reads what it held
    foreign = np.arange(10, dtype=np.int64)
    grown, own = appended(foreign[:5], np.array([99]), None)  # not ours: copied, the foreign array untouched
    assert grown.tolist() == [0, 1, 2, 3, 4, 99] and foreign[5] == 5 and own is not foreign
    wider, _ = appended(np.array(["a", "b"]), np.array(["ccc"]), None)
    assert wider.tolist() == ["a", "b", "ccc"]  # a longer string id widens the dtype

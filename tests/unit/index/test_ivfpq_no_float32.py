"""ivfpq keep_float32=false: the re-rank rows (float16 or int8) are the only copy of the vectors.

At 100M items x 128-d the float32 file alone is 51 GB, more than the disk a node of this kind gives a
build; without it the snapshot holds the codes, the re-rank rows and the tables. Re-ranking reads the
same rows either way, so the ANN answers must not change; exact search (ground truth, a filter's brute
force, the recall monitor) scores the stored rows, so it is exact over the rounded vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.data.synth_vectors import far_off_catalog
from towerann.errors import ConfigError
from towerann.index import create, vecfile
from towerann.index.protocol import Filter
from towerann.index.snapshot import load_snapshot, publish
from towerann.index.tune import recall_at_k

N, D, K = 12_000, 32, 50
PARAMS = {"nlist": 64, "pq_m": 8, "train_sample": 5000}


@pytest.fixture(scope="module")
def cat():  # type: ignore[no-untyped-def]
    return far_off_catalog(N, 100, D, seed=5)


def published(cat, root: Path, **params):  # type: ignore[no-untyped-def]
    index = create("ivfpq", D, **PARAMS, **params)
    index.build(cat.vectors, np.arange(N), (cat.clusters % 10).astype(np.int32))
    return load_snapshot(publish(index, root, "m"))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_without_the_float32_file_the_answers_are_the_same(cat, tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(vecfile, "EXACT_ROWS", 1000)  # exact search's row blocks: 12 here, merged
    kept = published(cat, tmp_path / "kept", rerank_dtype=dtype)
    lean = published(cat, tmp_path / "lean", rerank_dtype=dtype, keep_float32=False)
    version = next(p for p in (tmp_path / "lean").iterdir() if p.is_dir())
    assert not (version / "vectors.npy").exists() and (version / "rerank.npy").exists()
    row = 2 * D if dtype == "float16" else D + 4
    assert lean.memory(as_loaded=True)["disk_bytes_per_item"] == row  # the re-rank rows alone
    assert kept.memory(as_loaded=True)["disk_bytes_per_item"] == row + 4 * D
    q = cat.queries
    params = {"nprobe": 16, "rerank": 4 * K}
    a, b = kept.search(q, K, params=params), lean.search(q, K, params=params)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)  # re-ranking reads the same rows
    # exact search scores the rounded rows: nearly the float32 answer, not bit for bit
    truth = kept.exact_search(q, K).ids
    assert recall_at_k(lean.exact_search(q, K).ids, truth) >= 0.98
    # a filter's brute force: few qualifying (gathered rows) and most qualifying (every row, masked)
    for cats in ([3], list(range(9))):
        flt = Filter(categories=cats)
        got = lean.exact_search(q, K, filter=flt).ids
        assert recall_at_k(got, kept.exact_search(q, K, filter=flt).ids) >= 0.98
        allowed = set(np.flatnonzero(np.isin(cat.clusters % 10, cats)).tolist())
        assert set(got[got >= 0].tolist()) <= allowed


def test_items_added_after_a_load_are_saved_and_found_again(cat, tmp_path):
    lean = published(cat, tmp_path / "a", rerank_dtype="float16", keep_float32=False)
    new = cat.queries[:1] * 3  # its own direction: the top answer for that query
    lean.add(new, [10**6], [1])
    assert lean.search(cat.queries[:1], 1).ids[0, 0] == 10**6
    assert lean.exact_search(cat.queries[:1], 1).ids[0, 0] == 10**6
    again = load_snapshot(publish(lean, tmp_path / "b", "m"))
    assert len(again) == N + 1 and again.search(cat.queries[:1], 1).ids[0, 0] == 10**6
    assert np.allclose(again.vectors_of_slots(again.slots_of([10**6])), new.astype(np.float16), atol=1e-3)


def test_keep_float32_false_needs_rounded_rerank_rows():
    with pytest.raises(ConfigError, match="keep_float32=false needs rerank_dtype float16 or int8"):
        create("ivfpq", D, keep_float32=False)
    with pytest.raises(ConfigError, match="expected true or false"):
        create("ivfpq", D, rerank_dtype="float16", keep_float32="no")

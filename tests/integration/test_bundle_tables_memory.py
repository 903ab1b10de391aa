"""A served bundle's per-item tables (external ids, categories, the id lookup) are the page cache's,
not the server's: loading a bundle grows the process's anonymous memory by what its index holds and
no more (at 100M items these tables had held 36 bytes an item, twice the index's own 18.6).

Checked by effect in fresh processes (RssAnon: the process's own pages), on a catalog with ids as a
user's catalog has them (unsorted, sparse), and the tables still answer: ids mapped both ways, a
live write's new and replaced items read back, and the published files never take a write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from towerann.data.vectors_dir import VectorSet
from towerann.freshness.publish import publish_bundle
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.item_tables import ItemColumn

N, D = 500_000, 4

_GROWTH = """
import json, sys
import numpy as np
from towerann.index import load
from towerann.serving.bundle import RetrievalBundle
import towerann.model.export, towerann.model.model  # what a load imports, imported before measuring
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
path, what, probe = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
before = rss_anon()
if what == "index":
    held = load(path)
    answers = {}
else:
    held = RetrievalBundle.load(path)
    rows = np.array([held.item_internal.get(str(e)) for e in probe], np.int64)
    answers = {"rows": rows.tolist(), "ids": held.external_ids[rows].tolist()}
growth = rss_anon() - before
print(json.dumps({"growth": growth, **answers}))
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(11)
    external = rng.choice(10**12, size=N, replace=False).astype(np.int64)  # unsorted, sparse
    vs = VectorSet(
        vectors=rng.standard_normal((N, D)).astype(np.float32),
        ids=np.arange(N, dtype=np.int64),
        categories=rng.integers(0, 50, N).astype(np.int32),
        available=np.ones(N, bool),
        category_names=[f"c{i}" for i in range(50)],
        external_ids=external,
        model_version="tables-space",
        dim=D,
        metric="ip",
    )
    return publish_bundle(tmp_path_factory.mktemp("tables") / "root", None, vs, kind="exact"), external


def _run(path: Path, what: str, probe: list[int]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _GROWTH, str(path), what, json.dumps(probe)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_a_bundle_costs_its_index_and_not_its_id_tables(catalog) -> None:
    path, external = catalog
    probe_rows = [0, 1, N // 2, N - 1]
    probe = [int(external[r]) for r in probe_rows]
    index_only = min(_run(path, "index", probe)["growth"] for _ in range(2))
    bundle = [_run(path, "bundle", probe) for _ in range(2)]
    extra = min(b["growth"] for b in bundle) - index_only
    # in memory, the tables were 8 (ids) + 4 (categories) + 16 (sorted ids and order) bytes an item
    assert extra < 2 * N, f"loading the bundle's tables grew the process by {extra / N:.1f} B/item"
    assert bundle[0]["rows"] == probe_rows and bundle[0]["ids"] == probe  # both ways, from the mapped files


def test_live_writes_extend_the_mapped_tables_and_leave_the_files_alone(catalog) -> None:
    path, external = catalog
    b = RetrievalBundle.load(path)
    far = np.full((1, D), 100.0, np.float32)  # the new item: the top inner product for an all-ones query
    b.upsert([{"item_id": "7", "category": "c3"}], far)
    b.upsert([{"item_id": str(external[5]), "category": "new-category"}], -far)  # a published row replaced
    assert len(b.external_ids) == N + 1 and b.item_internal.get("7") == N and b.external_ids[N] == 7
    assert b.item_internal.get(str(external[5])) == 5 and b.category_code["new-category"] == 50
    assert b.external_ids[np.array([5, N])].tolist() == [int(external[5]), 7]  # mapped row and new row
    assert b.external_ids[b.index.search(np.ones((1, D), np.float32), 1).ids[0]].tolist() == [7]
    again = RetrievalBundle.load(path)  # the published files did not take the write
    assert len(again.external_ids) == N and again.item_internal.get("7") is None


def test_an_item_column_reads_published_rows_changed_rows_and_its_tail() -> None:
    translate = np.array([10, 11, 12, 0], np.int64)  # code -1 reads the last entry
    col = ItemColumn(np.array([2, -1, 0], np.int32), translate)
    assert col[0] == 12 and col[1] == 0 and col.dtype == np.int64
    col.append(np.array([5, 6], np.int64))
    col[2] = 99  # a published row changed: the base stays as it was
    col[4] = 7  # an added row changed in place
    assert col[np.array([4, 2, 0, 3, 1])].tolist() == [7, 99, 12, 5, 0]
    assert np.asarray(col).tolist() == [12, 0, 99, 5, 7] and len(col) == 5
    ids = ItemColumn(np.array(["a", "bb"]))
    ids.append(np.array(["cccc"]))  # a longer id widens the column
    assert ids[np.array([2, 0])].tolist() == ["cccc", "a"] and ids.dtype.kind == "U"
    with pytest.raises(IndexError):
        ids[3]

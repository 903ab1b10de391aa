"""ShardedIndex in local mode (shards in this process): partitioning, routing of writes to the owning
shard, merging by score, filters on every shard, and the snapshot layout. The Ray mode runs the same
code behind another ShardSet (tests/integration/test_ray_shards.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from towerann.errors import ArtifactError, BadRequest, ConfigError
from towerann.index import Filter, Index, create, filter_plan
from towerann.index import create as create_index
from towerann.index import load as load_index
from towerann.index.base import SlotIndex
from towerann.index.shard_hash import shard_of, split
from towerann.index.sharded import ShardedIndex
from towerann.index.snapshot import publish

D = 16


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 4000
    return {
        "vectors": _norm(rng.standard_normal((n, D))),
        "ids": rng.permutation(50 * n)[:n].astype(np.int64),
        "cats": rng.integers(0, 6, n).astype(np.int32),
        "brand": rng.integers(0, 3, n).astype(np.int32),
        "queries": _norm(rng.standard_normal((30, D))),
    }


def _pair(data, shards: int = 3, backend: str = "exact", **params):
    sharded = ShardedIndex(D, shards=shards, backend=backend, **params)
    plain = create(backend, D, **params)
    for ix in (sharded, plain):
        ix.build(data["vectors"], data["ids"], data["cats"], attributes={"brand": data["brand"]})
    return sharded, plain


def test_partition_is_a_fixed_even_hash() -> None:
    ids = np.arange(100_000)
    owner = shard_of(ids, 4)

    # fixed values (splitmix64 written out in plain Python): a change of hash would re-home every
    # item of every published snapshot
    def splitmix64(x: int) -> int:
        m = (1 << 64) - 1
        x = (x + 0x9E3779B97F4A7C15) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    some = [0, 1, 2, 3, 7, 10**12, 2**62 + 5]
    assert shard_of(some, 5).tolist() == [splitmix64(x) % 5 for x in some]
    assert shard_of([0, 1, 2, 3, 4, 5, 6, 7], 4).tolist() == [3, 1, 2, 1, 2, 2, 0, 3]
    counts = np.bincount(owner, minlength=4)
    assert counts.min() > 24_000 and counts.max() < 26_000, counts  # even, also for strided ids:
    assert np.bincount(shard_of(ids * 4, 4), minlength=4).min() > 24_000
    parts = split(ids[::-1], 4)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100_000))
    assert all((owner[::-1][p] == s).all() for s, p in enumerate(parts))
    with pytest.raises(ConfigError, match="shards"):
        ShardedIndex(D, shards=0)


def test_sharded_equals_unsharded_exact_with_filters(data) -> None:
    sharded, plain = _pair(data)
    q = data["queries"]
    for flt in (
        None,
        Filter(categories={1, 4}),
        Filter(attributes={"brand": {2}}),
        Filter(categories={0}, attributes={"brand": {0, 1}}),
    ):
        a, b = sharded.search(q, 40, filter=flt), plain.search(q, 40, filter=flt)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        assert (np.diff(a.scores, axis=1) <= 0).all()  # merged highest score first
        assert not a.partial and a.missing_shards == ()
    # more than any shard holds: the merge takes from every shard, then pads
    a = sharded.search(q[:2], 4100)
    assert (a.ids[:, :4000] >= 0).all() and (a.ids[:, 4000:] == -1).all()
    assert len(sharded) == 4000 and sum(sharded.shard_counts()) == 4000 and min(sharded.shard_counts()) > 1200
    assert sharded.attribute_names == ["brand"]
    np.testing.assert_array_equal(sharded.attribute_codes(data["ids"][:50])["brand"], data["brand"][:50])


def test_writes_go_to_the_owning_shard_only(data) -> None:
    sharded, plain = _pair(data)
    shards = sharded.shards.local_indexes()
    q = data["queries"]
    new_ids = np.arange(5, dtype=np.int64) + 10**9
    new = _norm(q[:5] + 0.001)
    owners = shard_of(new_ids, 3)
    before = sharded.shard_counts()
    for ix in (sharded, plain):
        ix.add(new, new_ids, categories=np.zeros(5, np.int32))
    for s, ix in enumerate(shards):
        assert [int(i) in ix for i in new_ids] == (owners == s).tolist()
        assert sharded.shard_counts()[s] == before[s] + int((owners == s).sum())
    np.testing.assert_array_equal(sharded.search(q[:5], 1).ids[:, 0], new_ids)
    # upsert: the new vector replaces the old on its shard (no second copy anywhere)
    moved = data["ids"][:20]
    far = _norm(-data["vectors"][:20])
    for ix in (sharded, plain):
        ix.add(far, moved, categories=data["cats"][:20])
    assert len(sharded) == len(plain) == 4005
    hidden, gone = data["ids"][100:400], data["ids"][400:500]
    for ix in (sharded, plain):
        ix.set_available(hidden, False)
        ix.remove(gone)
        ix.set_attributes(data["ids"][:10], {"brand": np.full(10, 2)})
    assert len(sharded) == 3905 and int(gone[0]) not in sharded and int(hidden[0]) in sharded
    for flt in (None, Filter(attributes={"brand": {2}})):
        a, b = sharded.search(q, 50, filter=flt), plain.search(q, 50, filter=flt)
        np.testing.assert_array_equal(a.ids, b.ids)
        assert not np.isin(a.ids, np.concatenate([hidden, gone])).any()
    sharded.set_available(hidden, True)
    plain.set_available(hidden, True)
    np.testing.assert_array_equal(sharded.search(q, 50).ids, plain.search(q, 50).ids)


def test_hnsw_shards_keep_recall_and_take_search_params(data) -> None:
    sharded, plain = _pair(data, shards=2, backend="hnsw", M=8, ef_construction=40)
    q = data["queries"]
    truth = plain.exact_search(q, 50).ids
    np.testing.assert_array_equal(sharded.exact_search(q, 50).ids, truth)

    def recall(ids: np.ndarray) -> float:
        return float(np.mean([len(np.intersect1d(a, b)) / 50 for a, b in zip(ids, truth)]))

    r_sharded, r_plain = recall(sharded.search(q, 50).ids), recall(plain.search(q, 50).ids)
    assert r_sharded >= r_plain - 0.01, (r_sharded, r_plain)  # smaller graphs at the same ef: no worse
    assert recall(sharded.search(q, 50, params={"ef": 50}).ids) < r_sharded  # ef reaches every shard
    with pytest.raises(BadRequest, match="nprobe"):
        sharded.search(q, 10, params={"nprobe": 3})


def test_snapshot_holds_one_checked_sub_snapshot_per_shard(data, tmp_path: Path) -> None:
    sharded, _ = _pair(data)
    path = publish(sharded, tmp_path / "root", "m1")
    top = json.loads((path / "manifest.json").read_text())
    assert top["backend"] == "sharded" and top["backend_state"]["shards"] == ["shard-000", "shard-001", "shard-002"]
    assert "shard-001/vectors.npy" in top["checksums"]  # the top manifest covers every shard's files
    for s in range(3):
        sub = json.loads((path / f"shard-00{s}" / "manifest.json").read_text())
        assert sub["backend"] == "exact" and sub["count"] == sharded.shard_counts()[s]
    loaded = load_index(tmp_path / "root", expected_model_version="m1", expected_dim=D)
    assert isinstance(loaded, ShardedIndex) and loaded.version == path.name
    res = loaded.search(data["queries"], 30)
    np.testing.assert_array_equal(res.ids, sharded.search(data["queries"], 30).ids)
    assert res.version == path.name
    # shard directories swapped: each shard's own checksums hold, but its items belong elsewhere
    for a, b in (("shard-000", "tmp"), ("shard-001", "shard-000"), ("tmp", "shard-001")):
        shutil.move(path / a, path / b)
    with pytest.raises(ArtifactError, match="checksum"):
        load_index(path)
    with pytest.raises(ArtifactError, match="belong to other shards"):
        load_index(path, verify=False)


def test_create_index_knows_plain_and_sharded_kinds() -> None:
    assert create_index("exact", D).kind == "exact"
    ix = create_index("sharded", D, shards=2, backend="hnsw", M=8)
    assert ix.describe() == "sharded(2 x hnsw)" and "ef" in ix.search_defaults
    with pytest.raises(ConfigError, match="plain backend"):
        create_index("sharded", D, backend="sharded")
    with pytest.raises(ConfigError, match="unknown index kind"):
        create_index("sharded", D, backend="nope")
    # one contract, two implementations: a sharded index holds no slots of its own, so no filter plan
    assert isinstance(ix, Index) and not isinstance(ix, SlotIndex) and isinstance(create_index("exact", D), SlotIndex)
    with pytest.raises(ConfigError, match="plain index"):
        filter_plan.calibrate(ix, np.eye(D, dtype=np.float32))


def test_the_core_and_local_mode_do_not_import_ray() -> None:
    """Ray is an extra: the cluster package, the bench module and a local sharded search run without it."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "import towerann.cluster, towerann.cluster.local_cluster, towerann.bench.shards\n"
        "from towerann.index.sharded import ShardedIndex\n"
        "ix = ShardedIndex(4, shards=2); ix.build(np.eye(4, dtype=np.float32), np.arange(4))\n"
        "assert ix.search(np.eye(4, dtype=np.float32), 1).ids[:, 0].tolist() == [0, 1, 2, 3]\n"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

"""A sharded index on a real local Ray cluster of two nodes (`ray start --head` plus a second node
started with `ray start --address`, as on several machines), one actor per shard.

Checked against a plain index in this process: sharded == unsharded on the exact backend (filters
included), recall parity on HNSW with every masked search through the library, writes routed to
the owning shard, a version switch under load that never merges two versions (and a rollback),
and a killed shard worker: partial answers while it is down, then back by itself with its writes.
Cluster-wide embedding (`towerann embed --ray`) writes the very files the local runner writes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from towerann.errors import BadRequest
from towerann.index import Filter, create
from towerann.index.shard_hash import shard_of
from towerann.index.sharded import ShardedIndex
from towerann.index.snapshot import publish

D, N = 16, 3000


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed (pip install '.[ray]'); CI is set, so this is an error, not a skip")
        pytest.skip("ray is not installed (pip install '.[ray]')")
    return ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two nodes: `ray start --head --port=P --num-cpus=1 --object-store-memory=300000000 ...`, then
    `ray start --address=127.0.0.1:P ...` (cluster.local_cluster); its own processes stopped after the module."""
    ray = _ray()
    from towerann.cluster.local_cluster import LocalCluster

    local = LocalCluster(nodes=2)
    try:
        address = local.start()
        ray.init(address=address, namespace="towerann-test", log_to_driver=False, logging_level="ERROR")
        local.wait_for_nodes()
        yield ray
    finally:
        local.stop()


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    centers = _norm(rng.standard_normal((20, D)))
    vectors = _norm(centers[rng.integers(0, 20, N)] + 0.3 * rng.standard_normal((N, D)))
    return {
        "vectors": vectors,
        "ids": rng.permutation(20 * N)[:N].astype(np.int64),
        "cats": rng.integers(0, 5, N).astype(np.int32),
        "brand": rng.integers(0, 3, N).astype(np.int32),
        "queries": _norm(centers[rng.integers(0, 20, 40)] + 0.3 * rng.standard_normal((40, D))),
    }


def _build(data, backend: str = "exact", id_offset: int = 0, **params) -> tuple[ShardedIndex, Any]:
    """A sharded index built here (to publish) and the plain index of the same items."""
    sharded, plain = ShardedIndex(D, shards=2, backend=backend, **params), create(backend, D, **params)
    for ix in (sharded, plain):
        ix.build(data["vectors"], data["ids"] + id_offset, data["cats"], attributes={"brand": data["brand"]})
    return sharded, plain


@pytest.fixture
def attach(cluster) -> Iterator[Any]:
    """attach(root, name): a ShardedIndex over fresh shard actors, killed after the test (each is a process)."""
    from towerann.cluster.ray_shards import attach as attach_shards

    made = []

    def make(root: Path, name: str):
        made.append(attach_shards(root, name=name))
        return made[-1]

    yield make
    for ix in made:
        ix.shards.close()


def test_sharded_equals_unsharded_on_exact_across_two_nodes(attach, data, tmp_path) -> None:
    sharded, plain = _build(data)
    publish(sharded, tmp_path, "m1")
    ix = attach(tmp_path, "exact")
    info = ix.shards.info()
    assert len({i["node"] for i in info}) == 2, "the two shards should sit on the two nodes"
    assert [i["count"] for i in info] == sharded.shard_counts() and len(ix) == N
    q = data["queries"]
    for flt in (None, Filter(categories={1, 3}), Filter(categories={0}, attributes={"brand": {2}})):
        got, want = ix.search(q, 30, filter=flt), plain.search(q, 30, filter=flt)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
        assert not got.partial and got.version == ix.version
    with pytest.raises(BadRequest, match="no attribute 'colour'"):  # a bad filter is the caller's error
        ix.search(q, 5, filter=Filter(attributes={"colour": {1}}))


def test_recall_parity_on_hnsw_through_the_library(attach, data, tmp_path) -> None:
    sharded, plain = _build(data, backend="hnsw", M=8, ef_construction=32)
    publish(sharded, tmp_path, "m1")
    ix = attach(tmp_path, "hnsw")
    q, k = data["queries"], 50
    p = {"exact_below": 0, "ef": 60}  # every masked search through the graph walk, at a modest ef
    for flt in (None, Filter(categories={0, 1, 2})):
        truth = plain.exact_search(q, k, filter=flt).ids
        recall = {
            name: np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(index.search(q, k, flt, p).ids, truth)])
            for name, index in (("sharded", ix), ("plain", plain))
        }
        assert recall["sharded"] >= recall["plain"] - 0.005, recall
        assert recall["plain"] < 1.0 or flt is not None  # the walk is approximate: the parity means something


def test_writes_route_to_the_owning_shard(attach, data, tmp_path) -> None:
    sharded, plain = _build(data)
    publish(sharded, tmp_path, "m1")
    ix = attach(tmp_path, "writes")
    q = data["queries"]
    new_ids = np.arange(4, dtype=np.int64) + 10**9
    new = _norm(q[:4] + 0.001)
    before = ix.shard_counts()
    hidden, gone = data["ids"][:200], data["ids"][200:300]
    for index in (ix, plain):
        index.add(new, new_ids, categories=np.zeros(4, np.int32))
        index.set_available(hidden, False)
        index.remove(gone)
    owners = shard_of(new_ids, 2)
    lost = np.bincount(shard_of(gone, 2), minlength=2)
    assert ix.shard_counts() == [before[s] + int((owners == s).sum()) - int(lost[s]) for s in range(2)]
    assert int(new_ids[0]) in ix and int(gone[0]) not in ix
    got = ix.search(q, 40)
    np.testing.assert_array_equal(got.ids, plain.search(q, 40).ids)
    np.testing.assert_array_equal(got.ids[:4, 0], new_ids)


def test_version_switch_under_load_never_mixes_versions(attach, data, tmp_path) -> None:
    """v2 holds the same vectors under ids + 10**6: a merged answer holding ids of both would be a mix."""
    v1, _ = _build(data)
    publish(v1, tmp_path, "m1")
    ix = attach(tmp_path, "versions")
    first = ix.version
    v2, _ = _build(data, id_offset=10**6)
    second = publish(v2, tmp_path, "m2").name
    q = data["queries"][:4]
    seen: list[tuple[str | None, bool, bool]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            r = ix.search(q, 20)
            seen.append((r.version, bool((r.ids < 10**6).all()), bool((r.ids >= 10**6).all())))

    def answered_with(version: str, since: int = 0) -> None:  # a few answers, however loaded the machine
        deadline = time.monotonic() + 30
        while sum(v == version for v, _, _ in seen[since:]) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    answered_with(first)
    ix.switch(second)
    answered_with(second)
    n_before = len(seen)
    ix.switch(first)  # rollback: the same path back
    answered_with(first, since=n_before)
    stop.set()
    for t in threads:
        t.join()
    assert {v for v, _, _ in seen} == {first, second}, "the load should have seen both versions"
    assert any(v == first for v, _, _ in seen[n_before:]), "no answer named the rolled-back version"
    for version, old, new in seen:
        assert old if version == first else new, f"an answer named {version} but held ids of the other version"
    assert ix.version == first and len(ix) == N


def test_killed_shard_worker_gives_partial_then_recovers(attach, data, tmp_path) -> None:
    sharded, plain = _build(data)
    publish(sharded, tmp_path, "m1")
    ix = attach(tmp_path, "faults")
    q = data["queries"]
    gone = data["ids"][:50]
    ix.remove(gone)  # a write the restarted worker must get back (its snapshot still has these items)
    plain.remove(gone)
    victim = ix.shards.info()[0]
    os.kill(victim["pid"], signal.SIGKILL)
    partial = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = ix.search(q, 20, deadline_s=2.0)
        if r.partial:
            partial = r
        elif partial is not None:
            break
        time.sleep(0.2)
    assert partial is not None, "the search never noticed the dead shard"
    assert partial.missing_shards == (0,)
    valid = partial.ids[partial.ids >= 0]  # shard 1's answer alone, still complete and sorted
    assert len(valid) == partial.ids.size and (shard_of(valid, 2) == 1).all()
    assert (np.diff(partial.scores, axis=1) <= 0).all()
    assert not r.partial, "the shard did not come back within 60 s"
    back = ix.shards.info()[0]
    assert back["pid"] != victim["pid"] and back["incarnation"] != victim["incarnation"]
    np.testing.assert_array_equal(r.ids, plain.search(q, 20).ids)  # its removals were replayed
    assert not np.isin(r.ids, gone).any()
    assert ix.shards.metrics.as_dict()[0]["errors"] + ix.shards.metrics.as_dict()[0]["late"] >= 1


def test_bench_shards_runs_on_the_cluster(cluster, tmp_path) -> None:
    """`towerann bench shards` at a toy size on this module's cluster: every path timed, recall kept."""
    from towerann.bench.shards import run_shards_bench

    result = run_shards_bench(
        3000, dim=16, k=20, shard_counts=(2,), n_queries=30, n_time=5, out=tmp_path, compiled=False
    )  # compiled graphs take seconds each to set up: the bench runs them
    assert [p["shards"] for p in result["points"]] == [2]
    for p in result["points"]:
        assert p["recall"] >= result["unsharded"]["recall"] - 0.005 and p["ray_recall"] == p["recall"]
        assert p["shard_nodes"] == p["shards"]  # S=2: one shard on each node
        assert "search_compiled" not in p
        for path in ("search_plain", "noop_plain", "merge", "local_in_process"):
            assert p[path]["n"] == 5 and p[path]["p50_ms"] > 0, path
    assert (tmp_path / "shards-3000.json").is_file() and (tmp_path / "shards-3000.png").is_file()
    assert cluster.is_initialized()  # the bench used this cluster and left it running


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic catalog and a small trained model (dataset dir, model dir)."""
    from towerann.data.synth import generate
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    base = tmp_path_factory.mktemp("ray-embed")
    dataset = generate(base / "ds", 2500, 300, seed=3)
    train(dataset, base / "model", TowerConfig(dim=16), TrainConfig(epochs=1), progress=False)
    return dataset, base / "model"


def _same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def test_ray_embedding_writes_the_local_runners_files_byte_for_byte(cluster, catalog, tmp_path) -> None:
    """Parts (700 rows, tower batches of 300: neither lines up with the other) as tasks on both nodes:
    every vector part, id part, attribute array and the manifest equal the local runner's, byte for byte."""
    from towerann.cluster.ray_embed import embed_catalog_ray
    from towerann.embed.runner import embed_catalog

    dataset, model = catalog
    kw = dict(batch_size=300, part_size=700, progress=False, attributes=("brand",))
    local = embed_catalog(model, dataset, tmp_path / "local", **kw)
    stats: dict = {}
    remote = embed_catalog_ray(model, dataset, tmp_path / "ray", stats=stats, **kw)
    names = _same_files(local, remote)
    assert sum(n.startswith("vectors-") for n in names) == 4 and "attr_brand.npy" in names
    assert stats["nodes"] == 2  # the parts really ran on the worker node too, not only beside the driver


def test_embed_cli_on_the_cluster_resumes_a_local_run(cluster, catalog, tmp_path) -> None:
    """`towerann embed --ray ADDRESS` in its own process, attached to the running cluster, picks up a
    local run interrupted after one part and finishes it: the same files as an uninterrupted local run."""
    import subprocess
    import sys

    from towerann.embed.runner import embed_catalog, work_dir_for

    dataset, model = catalog
    whole = embed_catalog(model, dataset, tmp_path / "whole", batch_size=300, part_size=700, progress=False)
    out = tmp_path / "resumed"
    assert embed_catalog(
        model, dataset, out, batch_size=300, part_size=700, progress=False, max_parts=1
    ) == work_dir_for(out)
    address = cluster.get_runtime_context().gcs_address
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "towerann.cli",
            "embed",
            "--model",
            str(model),
            "--items",
            str(dataset),
            "--out",
            str(out),
            "--batch-size",
            "300",
            "--part-size",
            "700",
            "--ray",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "embedded 2500 items" in done.stdout
    _same_files(whole, out)

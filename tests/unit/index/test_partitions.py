"""Per-value partitions of an HNSW index (index/partition.py): the planner's "partition" path.

A clustered catalog (categories = clusters, so a category filter keeps items that sit together: the
case where HNSW's filtered walk loses recall) big enough that the sub-indexes really are walked
(exact_below=0, filter_path forced). Checked: only allowed items come back; recall against exact
filtered search at low, middle and high selectivity; a value below the minimum partition size is
brute force; live writes (upsert into another category, attribute change, removal, a value growing
past the minimum) keep the partitions right; save/load keeps them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from towerann.artifacts import write_manifest
from towerann.errors import ArtifactError
from towerann.index import Filter, create, filter_plan, value_partitions
from towerann.index.snapshot import load_snapshot, publish
from towerann.index.tune import recall_at_k

N, DIM, K, MIN = 12_000, 16, 50, 700
PARAMS = {"exact_below": 0, "filter_path": "partition", "ef": 120}
FLOOR = 0.9


@pytest.fixture(autouse=True)
def walk_small_partitions(monkeypatch, request):
    """Partitions of this small catalog are walked, not scanned (a walk pays off at ~16 x ef items)."""
    if "scan" not in request.node.name:
        monkeypatch.setattr(value_partitions, "WALK_ROWS_PER_EF", 2)


@pytest.fixture(scope="module")
def world() -> dict:
    from towerann.data.synth_vectors import far_off_catalog

    cat = far_off_catalog(N, 40, DIM, seed=7, n_clusters=30, noise=0.3)
    rng = np.random.default_rng(2)
    return {
        "vectors": cat.vectors,
        "queries": cat.queries,
        "cats": cat.clusters,
        "brand": rng.integers(0, 4, N).astype(np.int32),
        "available": rng.random(N) > 0.03,
        "ids": np.arange(N, dtype=np.int64) * 3 + 5,
    }


def _build(w: dict, **params):
    ix = create("hnsw", DIM, M=8, ef_construction=40, **params)
    ix.build(w["vectors"], w["ids"], w["cats"], w["available"], attributes={"brand": w["brand"]})
    return ix


@pytest.fixture(scope="module")
def ix(world):
    return _build(world, partition_by="category", partition_min=MIN)


def _sizes(w: dict) -> tuple[np.ndarray, np.ndarray]:
    codes, counts = np.unique(w["cats"], return_counts=True)
    return codes, counts


def _share(w: dict, share: float) -> frozenset[int]:
    """Partitioned categories, smallest first, until about `share` of the catalog is kept."""
    codes, counts = _sizes(w)
    out, total = [], 0
    for i in np.argsort(counts):
        if counts[i] < MIN or total + counts[i] > 1.3 * share * N:
            continue
        out.append(int(codes[i]))
        total += counts[i]
        if total >= share * N:
            break
    return frozenset(out)


def test_partitions_follow_the_values_with_enough_items(ix, world):
    codes, counts = _sizes(world)
    big = sorted(int(c) for c, n in zip(codes, counts) if n >= MIN)
    part = ix.partitions
    assert sorted(part.values) == big and len(big) >= 4
    for value, sub in zip(part.values, part.subs):
        want = np.flatnonzero(ix.slot_categories == value)
        assert sorted(sub.slot_ids.tolist()) == want.tolist()  # a sub-index's ids are the host's slots
        assert (part.home.data[want] == part.values.index(value)).all()
    assert (part.home.data[~np.isin(ix.slot_categories, big)] == -1).all()
    mem = ix.partition_info()["memory"]
    assert mem["items"] == int(np.isin(world["cats"], big).sum())
    assert mem["bytes_per_partitioned_item"] > DIM * 4  # at least the vector stored again
    assert "partition" in ix.filter_paths and "partitions=category" in ix.describe()


@pytest.mark.parametrize("share", [0.06, 0.2, 0.5])
def test_partition_path_holds_only_allowed_items_and_keeps_recall(ix, world, share):
    cats = _share(world, share)
    f = Filter(categories=cats)
    assert cats and 0.5 * share * N <= np.isin(world["cats"], list(cats)).sum() <= 1.3 * share * N
    keep = np.isin(world["cats"], list(cats)) & world["available"]
    route = ix.partitions.route(ix.mask_for(f), K, PARAMS)
    assert route.aligned and route.walk, "the partitions were not walked"
    res = ix.search(world["queries"], K, filter=f, params=PARAMS)
    assert res.exact_rows == 0
    assert set(res.ids.ravel().tolist()) <= set(world["ids"][keep].tolist())
    truth = ix.exact_search(world["queries"], K, filter=f).ids
    assert recall_at_k(res.ids, truth) >= FLOOR
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()  # merged by score, best first


def test_a_value_below_the_minimum_is_brute_force_and_mixes_with_partitions(ix, world):
    codes, counts = _sizes(world)
    small = int(codes[np.flatnonzero(counts < MIN)[0]])
    big = int(codes[np.argmax(counts)])
    for cats in ({small}, {small, big}):
        f = Filter(categories=frozenset(cats))
        route = ix.partitions.route(ix.mask_for(f), K, PARAMS)
        assert route.rest is not None and set(ix.slot_categories[route.rest.idx].tolist()) == {small}
        assert [ix.partitions.values[p] for p, _ in route.walk] == ([] if cats == {small} else [big])
        res = ix.search(world["queries"], K, filter=f, params=PARAMS)
        truth = ix.exact_search(world["queries"], K, filter=f).ids
        if cats == {small}:
            np.testing.assert_array_equal(res.ids, truth)  # brute force: the exact answer
        else:
            assert recall_at_k(res.ids, truth) >= FLOOR
            assert np.isin(res.ids, world["ids"][world["cats"] == small]).any()  # both halves merged


def test_a_partition_with_fewer_qualifying_items_than_a_walk_costs_is_scanned(ix, world):
    codes, counts = _sizes(world)
    value = int(codes[np.argsort(-counts)[1]])  # partitioned, but under 16 x ef items
    assert MIN <= counts[codes == value][0] < value_partitions.WALK_ROWS_PER_EF * PARAMS["ef"]
    f = Filter(categories=frozenset({value}))
    route = ix.partitions.route(ix.mask_for(f), K, PARAMS)
    assert not route.walk and route.rest.count == int((np.isin(world["cats"], [value]) & world["available"]).sum())
    res = ix.search(world["queries"], K, filter=f, params=PARAMS)
    np.testing.assert_array_equal(res.ids, ix.exact_search(world["queries"], K, filter=f).ids)


def test_a_filter_on_another_attribute_is_not_walked_through_every_partition(ix, world):
    f = Filter(attributes={"brand": {1}})
    assert not ix.partitions.route(ix.mask_for(f), K, PARAMS).aligned
    res = ix.search(world["queries"], K, filter=f, params=PARAMS)
    np.testing.assert_array_equal(res.ids, ix.exact_search(world["queries"], K, filter=f).ids)


def test_live_writes_keep_partitions_right(world):
    ix = _build(world, partition_by="category", partition_min=MIN)
    codes, counts = _sizes(world)
    a, b = (int(c) for c in codes[np.argsort(-counts)[:2]])
    item = int(world["ids"][np.flatnonzero((world["cats"] == a) & world["available"])[0]])
    q = world["vectors"][(item - 5) // 3]
    fa, fb = Filter(categories=frozenset({a})), Filter(categories=frozenset({b}))
    ix.set_available(world["ids"], True)  # nothing hidden: a partition is walked without a mask
    pa, pb = ix.partitions.values.index(a), ix.partitions.values.index(b)
    assert ix.partitions.route(ix.mask_for(fa), K, PARAMS).walk == [(pa, None)]
    res = ix.search(world["queries"], K, filter=fa, params=PARAMS)
    assert set(res.ids.ravel().tolist()) <= set(world["ids"][world["cats"] == a].tolist())
    assert ix.search(q, K, filter=fa, params=PARAMS).ids[0, 0] == item
    ix.add(q[None, :], [item], categories=[b])  # upsert into another category: the item moves partition
    assert item not in ix.search(q, K, filter=fa, params=PARAMS).ids
    assert ix.search(q, K, filter=fb, params=PARAMS).ids[0, 0] == item
    assert len(ix.partitions.subs[pa]) == int(counts[codes == a][0]) - 1  # the dead slot left partition a
    assert len(ix.partitions.subs[pb]) == int(counts[codes == b][0]) + 1
    ix.set_available([item], False)
    assert item not in ix.search(q, K, filter=fb, params=PARAMS).ids
    ix.set_available([item], True)
    ix.remove([item])
    assert item not in ix.search(q, K, filter=fb, params=PARAMS).ids
    assert len(ix.partitions.subs[pb]) == int(counts[codes == b][0])  # removed from its partition
    # a new value gets its partition on a write of at least the minimum, not one item at a time
    rows = np.flatnonzero(world["cats"] == b)[:MIN]
    trickle = int(codes.max()) + 1
    ix.add(world["vectors"][rows[:-1]], np.arange(MIN - 1) + 20 * N, categories=np.full(MIN - 1, trickle))
    ix.add(world["vectors"][rows[-1:]], [21 * N], categories=[trickle])  # the one that reaches MIN
    assert trickle not in ix.partitions.values  # no pass over the catalog for a one-item write
    new_cat = trickle + 1
    ix.add(world["vectors"][rows], np.arange(MIN) + 10 * N, categories=np.full(MIN, new_cat))
    assert new_cat in ix.partitions.values and trickle not in ix.partitions.values
    f = Filter(categories=frozenset({new_cat}))
    assert ix.partitions.route(ix.mask_for(f), K, PARAMS).walk
    res = ix.search(world["queries"], K, filter=f, params=PARAMS)
    assert set(res.ids.ravel().tolist()) <= set((np.arange(MIN) + 10 * N).tolist())


def test_an_attribute_partition_moves_an_item_whose_value_changes(world):
    ix = _build(world, partition_by="brand", partition_min=MIN)
    assert sorted(ix.partitions.values) == [0, 1, 2, 3]
    item = int(world["ids"][np.flatnonzero((world["brand"] == 0) & world["available"])[0]])
    q = world["vectors"][(item - 5) // 3]
    f0, f2 = Filter(attributes={"brand": {0}}), Filter(attributes={"brand": {2}})
    assert ix.search(q, K, filter=f0, params=PARAMS).ids[0, 0] == item
    ix.set_attributes([item], {"brand": np.array([2])})
    assert item not in ix.search(q, K, filter=f0, params=PARAMS).ids
    assert ix.search(q, K, filter=f2, params=PARAMS).ids[0, 0] == item
    both = ix.search(q, K, filter=Filter(attributes={"brand": {0, 2}}), params=PARAMS).ids[0]
    assert list(both).count(item) == 1  # in one partition only
    ix.set_attributes([item], {"brand": np.array([0])})  # and back
    assert ix.search(q, K, filter=f0, params=PARAMS).ids[0, 0] == item
    assert item not in ix.search(q, K, filter=f2, params=PARAMS).ids


def test_save_and_load_keep_the_partitions(ix, world, tmp_path):
    path = publish(ix, tmp_path, "m1")
    manifest = json.loads((path / "manifest.json").read_text())
    assert not [f for f in manifest["checksums"] if f.endswith((".pkl", ".pickle"))]
    assert any(f.startswith("partitions/") for f in manifest["checksums"])
    loaded = load_snapshot(path)
    assert loaded.partitions.values == ix.partitions.values
    assert loaded.partition_info()["memory"]["items"] == ix.partition_info()["memory"]["items"]
    f = Filter(categories=_share(world, 0.15))
    np.testing.assert_array_equal(
        loaded.search(world["queries"], K, filter=f, params=PARAMS).ids,
        ix.search(world["queries"], K, filter=f, params=PARAMS).ids,
    )
    manifest["build_params"]["partition_min"] = MIN + 1  # not what the files were built with
    write_manifest(path / "manifest.json", manifest)
    with pytest.raises(ArtifactError, match="partitions"):
        load_snapshot(path)


def test_calibration_measures_the_partition_path(ix, world):
    points = filter_plan.measure(ix, world["queries"], K, shares=(0.05, 0.3), n_time=3, params={"ef": 120})
    part = [p for p in points if p["path"] == "partition"]
    assert len(part) == 2 and all(p["recall"] >= FLOOR for p in part)
    table = filter_plan.derive(points, K, 0.95)
    assert filter_plan.check_table(table) and all(row[2] in ix.filter_paths for row in table)


def test_partition_beam_scale_is_the_smallest_that_holds_the_floor(ix, world):
    q, floor = world["queries"], 0.97
    saved = ix.search_defaults
    ix.search_defaults = {**saved, "ef": 400}
    try:
        scale = filter_plan.partition_ef_scale(ix, q, K, floor)
    finally:
        ix.search_defaults = saved
    assert scale in filter_plan.PARTITION_EF_SCALES
    codes, counts = _sizes(world)
    probes = [
        Filter(categories=frozenset({int(c)})) for c in codes[np.argsort(-counts)[: filter_plan.PARTITION_PROBES]]
    ]

    def worst(at_scale: float) -> float:
        at = {**PARAMS, "ef": 400, "partition_ef_scale": at_scale}
        assert all(ix.partitions.route(ix.mask_for(f), K, at).walk for f in probes)  # walked, not scanned
        return min(
            recall_at_k(ix.search(q, K, filter=f, params=at).ids, ix.exact_search(q, K, filter=f).ids) for f in probes
        )

    assert worst(scale) >= floor
    i = filter_plan.PARTITION_EF_SCALES.index(scale)
    if i:  # the next narrower beam misses the floor on some probe
        assert worst(filter_plan.PARTITION_EF_SCALES[i - 1]) < floor


def test_the_measured_walk_cost_decides_which_partitions_are_walked(ix, world):
    cost = filter_plan.partition_walk_cost(ix, world["queries"], K, n_time=5)
    assert cost > 0
    f = Filter(categories=frozenset({int(v) for v in ix.partitions.values}))
    mask = ix.mask_for(f)
    assert ix.partitions.route(mask, K, {**PARAMS, "partition_walk_cost": 0.01}).walk  # walks are cheap: walk
    dear = {**PARAMS, "partition_walk_cost": N}  # a walk dearer than scanning the catalog: scan everything
    assert not ix.partitions.route(mask, K, dear).walk
    np.testing.assert_array_equal(
        ix.search(world["queries"], K, filter=f, params=dear).ids, ix.exact_search(world["queries"], K, filter=f).ids
    )


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "exact"])
def test_forcing_the_partition_path_on_an_index_without_partitions_is_a_400(world, kind):
    from towerann.errors import BadRequest

    plain = create(kind, DIM)
    plain.build(world["vectors"][:2000], np.arange(2000), world["cats"][:2000])
    with pytest.raises(BadRequest, match="no partitions"):
        plain.search(world["queries"][:1], 10, Filter(categories=frozenset({0})), params={"filter_path": "partition"})

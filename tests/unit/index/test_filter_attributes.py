"""Filters on category and on declared attributes, through each backend's production (library) paths.

One small clustered catalog (towerann.data.synth_vectors.far_off_catalog: categories = its clusters, so a
filter keeps items that sit together, the hard case for graph search) with two extra attributes.
Every backend is searched on each of its library paths (filter_path forced, never brute force):
results hold only allowed items, recall against exact filtered search meets a floor at low, middle
and high selectivity, and a filter keeping fewer items than k returns all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.artifacts import write_manifest
from towerann.errors import ArtifactError, BadRequest, DataError
from towerann.index import Filter, create, filter_plan
from towerann.index.snapshot import load_snapshot, publish
from towerann.index.tune import recall_at_k

N, DIM, K = 6000, 32, 50
KINDS = ("exact", "hnsw", "ivfpq", "scann")
FLOOR = 0.9  # recall@50 vs exact filtered search, every path and share


@pytest.fixture(scope="module")
def world() -> dict:
    from towerann.data.synth_vectors import far_off_catalog

    cat = far_off_catalog(N, 60, DIM, seed=3, n_clusters=60, noise=0.3)
    rng = np.random.default_rng(5)
    brand = rng.integers(0, 4, N).astype(np.int32)
    market = rng.integers(0, 3, N).astype(np.int32)
    market[rng.random(N) < 0.05] = -1  # no value: matched by no filter
    available = rng.random(N) > 0.02
    return {
        "vectors": cat.vectors,
        "queries": cat.queries,
        "cats": cat.clusters,
        "brand": brand,
        "market": market,
        "available": available,
        "ids": np.arange(N, dtype=np.int64) * 7 + 1,
    }


def build(kind: str, w: dict):
    ix = create(kind, DIM)
    ix.build(w["vectors"], w["ids"], w["cats"], w["available"], attributes={"brand": w["brand"], "market": w["market"]})
    return ix


@pytest.fixture(scope="module")
def indexes(world) -> dict:
    return {kind: build(kind, world) for kind in KINDS}


def categories_for(w: dict, share: float) -> frozenset[int]:
    """Whole categories, smallest first, until about `share` of the catalog is kept."""
    codes, counts = np.unique(w["cats"], return_counts=True)
    out, total = [], 0
    for i in np.argsort(counts):
        if total >= share * N:
            break
        out.append(int(codes[i]))
        total += counts[i]
    return frozenset(out)


def allowed(w: dict, f: Filter) -> np.ndarray:
    keep = w["available"].copy()
    if f.categories is not None:
        keep &= np.isin(w["cats"], list(f.categories))
    for name, codes in f.attributes:
        keep &= np.isin(w[name], list(codes))
    return w["ids"][keep]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share", [0.03, 0.1, 0.5])
def test_every_library_path_returns_only_allowed_items_at_the_recall_floor(indexes, world, kind, share) -> None:
    ix = indexes[kind]
    f = Filter(categories=categories_for(world, share))
    ok = allowed(world, f)
    assert len(ok) > K
    truth = ix.exact_search(world["queries"], K, filter=f).ids
    assert np.isin(truth, ok).all()
    for path in ix.filter_paths:
        res = ix.search(world["queries"], K, filter=f, params={"filter_path": path})
        assert np.isin(res.ids, ok).all(), (kind, path)
        assert (res.ids >= 0).all()  # exactly k: at least k qualify
        if path == "filtered":
            # the library answered (rows it left short would be exact): no brute force hidden here
            assert res.exact_rows < len(world["queries"]) // 4, (kind, path, res.exact_rows)
        recall = recall_at_k(res.ids, truth)
        assert recall >= FLOOR, (kind, path, share, recall)


@pytest.mark.parametrize("kind", KINDS)
def test_a_filter_keeping_fewer_items_than_k_returns_all_of_them(indexes, world, kind) -> None:
    f = Filter(categories=categories_for(world, 0.001), attributes={"brand": [2]})
    ok = allowed(world, f)
    assert 0 < len(ok) < K
    res = indexes[kind].search(world["queries"][:5], K, filter=f, params={"filter_path": "filtered"})
    for row in res.ids:
        assert sorted(row[: len(ok)]) == sorted(ok) and (row[len(ok) :] == -1).all()


def test_attributes_and_across_or_within(indexes, world) -> None:
    ix = indexes["hnsw"]
    f = Filter(attributes={"brand": [0, 3], "market": [1]})
    ok = allowed(world, f)
    assert set(ok) < set(allowed(world, Filter(attributes={"brand": [0, 3]})))
    k = len(ok) + 10
    res = ix.search(world["queries"][:3], k, filter=f)
    for row in res.ids:
        assert set(row[row >= 0]) == set(ok)  # every allowed item, nothing else (k exceeds them)
    both = Filter(categories=categories_for(world, 0.3), attributes={"brand": [1]})
    assert set(ix.exact_search(world["queries"][:3], N, filter=both).ids.ravel()) - {-1} == set(allowed(world, both))
    with pytest.raises(BadRequest, match="no attribute 'colour'"):
        ix.search(world["queries"][:1], 5, filter=Filter(attributes={"colour": [0]}))


def test_set_attributes_takes_effect_on_the_next_search_and_survives_a_snapshot(world, tmp_path: Path) -> None:
    ix = build("exact", world)
    item = int(world["ids"][np.flatnonzero(world["available"] & (world["brand"] == 1))[0]])
    new_brand = Filter(attributes={"brand": [9]})
    assert (ix.search(world["queries"][:1], 5, filter=new_brand).ids == -1).all()
    ix.set_attributes([item, 10**12], {"brand": [9, 9]})  # an unknown id is ignored
    assert ix.search(world["queries"][:1], 5, filter=new_brand).ids[0].tolist() == [item, -1, -1, -1, -1]
    assert ix.attribute_codes([item, 10**12])["brand"].tolist() == [9, -1]
    ix.add(world["vectors"][:1], [item], [0])  # an upsert without attributes: no value any more
    assert ix.attribute_codes([item])["brand"].tolist() == [-1]
    ix.set_attributes([item], {"brand": [9]})
    loaded = load_snapshot(publish(ix, tmp_path / "root", "m1"))
    assert loaded.attribute_names == ["brand", "market"]
    assert loaded.search(world["queries"][:1], 5, filter=new_brand).ids[0].tolist() == [item, -1, -1, -1, -1]
    with pytest.raises(DataError, match="attribute name"):
        ix.add(world["vectors"][:1], [5], attributes={"Bad Name": [0]})


def test_calibration_stores_a_plan_that_the_planner_follows_and_a_snapshot_keeps(world, tmp_path: Path) -> None:
    ix = build("hnsw", world)
    result = filter_plan.calibrate(ix, world["queries"], ks=(K,), shares=(0.01, 0.2, 0.6), n_queries=30)
    table = ix.search_defaults["filter_plan"]
    assert table == result["plan"] and table[-1][1] == 1.0 and all(row[0] == K for row in table)
    assert {p["path"] for p in result["points"]} == {"exact", "filtered", "post"}
    assert ix.search_defaults["exact_below"] == 0
    # the planner reads the table: a share maps to its row's path; k <= count always goes exact
    p = {**ix.search_defaults, "filter_plan": [[K, 0.05, "exact"], [K, 0.4, "filtered"], [K, 1.0, "post"]]}
    assert filter_plan.choose(100, N, K, p) == "exact"
    assert filter_plan.choose(1200, N, K, p) == "filtered"
    assert filter_plan.choose(5000, N, K, p) == "post"
    assert filter_plan.choose(5000, N, 10 * K, p) == "post"  # above every calibrated k: the largest one's rows
    assert filter_plan.choose(K, N, K, {**p, "filter_path": "post"}) == "exact"
    assert filter_plan.choose(1200, N, K, {"exact_below": 16384}) == "exact"  # nothing measured: today's constant
    assert filter_plan.choose(20000, 40000, K, {"exact_below": 16384}) is None  # the backend's own choice
    loaded = load_snapshot(publish(ix, tmp_path / "root", "m1"))
    assert loaded.search_defaults["filter_plan"] == table
    assert loaded.filter_calibration["plan"] == table
    with pytest.raises(BadRequest, match="filter_path"):
        ix.search(world["queries"][:1], 5, params={"filter_path": "fastest"})


def test_a_snapshot_with_a_broken_plan_is_refused(world, tmp_path: Path) -> None:
    import json

    ix = build("exact", world)
    snap = publish(ix, tmp_path / "root", "m1")
    m = json.loads((snap / "manifest.json").read_text())
    m["search_defaults"]["filter_plan"] = [[100, 0.5, "teleport"]]
    write_manifest(snap / "manifest.json", m)
    with pytest.raises(ArtifactError, match="filter_plan"):
        load_snapshot(snap)

"""One contract, every ANN backend, on the path production takes.

`Index.search` answers a masked search (anything removed, replaced, hidden or filtered out) by
brute force when at most `exact_below` items qualify (16384 by default). So the catalog here is
bigger than that (d=32, 30,000 items, 40 clusters; queries drawn differently, as mixtures of
clusters plus a shared offset, as a user tower's are), and every test that masks anything runs
twice: as configured (default exact_below: removals, upserts, hidden items and the broad filter
reach the library, the narrow and rare filters are brute force) and with every masked search
forced through the library (exact_below=0). Unmasked searches have one path and run once.

Every result is checked against a plain-numpy oracle over the items the index should hold
(`Catalog`, which never calls towerann): exactly min(k, qualifying) distinct qualifying ids per
row, then padding; scores equal to the true inner products; rows sorted; recall@k at or above a
floor (a found item counts as a hit when its true score reaches the k-th best, within 1e-5).
Where the base class answers by brute force the floor is 1.0.

Recall@100 measured (k=40 for the rare filter; 100 queries, data seed 42; five runs of this
file: faiss builds repeat exactly, ScaNN varies by <0.003; seeds 1-3 of the same generator
moved the unmasked, removed and filter values by <0.02). "lib": the library path; "exact": the
base class' brute force, which the configured index takes at or below exact_below (floor 1.0):

    FLOORS key     what is masked                         configured  forced  hnsw   ivfpq  scann
    unmasked       nothing (also: after adding 10 items)  lib         lib     0.989  0.803  0.952
    removed        top-30 of each query + 1000 (3.6k)     lib         lib     0.983  0.777  0.979-0.982
    removed+broad  the same, and the broad filter (15.6k) exact       lib     0.993  0.838  0.984
    hidden         top-10 of each query + 20% (6.8k)      lib         lib     0.991  0.817  0.962-0.964
    upserted       top-10 of 20 queries moved (196)       lib         lib     0.988  0.806  0.952-0.954
    broad          6 of 10 categories (17.7k qualify)     lib         lib     0.995  0.860  0.977-0.979
    narrow         3 of 10 categories (8.8k qualify)      exact       lib     0.998  0.911  0.981-0.983
    rare           1% category (300 qualify), k=40        exact       lib     0.906  1.000  1.000
    (CHEAP)        nothing; ef=16 (i.e. ef=k) / nprobe=4 / leaves=1           0.930  0.330  0.308-0.323

(IVF-PQ's rare-filter row: nprobe is widened by 1/selectivity, so every list is probed; ScaNN's:
the over-fetch cap leaves the library short, so the exact fallback answers.) FLOORS sit
~0.02-0.03 below each measured value. The cheap settings show the floors bite: each lands far
below its backend's unmasked floor (test_search_params_matter asserts it), so an HNSW searching
with ef=k (what {"ef": 16} becomes at k=100) fails the floor (0.930 < 0.965), and a backend that
ignored its search parameter (always its default ef/nprobe/leaves) fails that test, as the cheap
setting then scores like the default. IVF-PQ is low at its defaults on this catalog (IVF693,PQ4x8:
nprobe=32 probes 5% of the lists for out-of-distribution queries); its floors guard that
configuration, they are not a target.

Run time: ~50 s for the whole file on 2 cores. tools/mutants.py runs targeted mutations of
src/towerann against this file; every one of its mutants must be killed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from towerann.errors import ArtifactError, BackendUnavailable, IndexIncompatible
from towerann.index import Filter, create
from towerann.index import load as load_index
from towerann.index.snapshot import publish

load = load_snapshot = load_index

D, N, NQ, CLUSTERS = 32, 30_000, 100, 40
K = 100
MODEL = "model-v1"
# sharded: towerann.cluster.ShardedIndex with its shards in this process (3 exact shards)
PARAMS = {
    "exact": {},
    "hnsw": {"M": 16, "ef_construction": 64},
    "ivfpq": {},
    "scann": {},
    "sharded": {"shards": 3, "backend": "exact"},
}
KINDS = ("exact", "hnsw", "ivfpq", "scann", "sharded")
LIBRARY_KINDS = ("hnsw", "ivfpq", "scann")  # backends with an approximate library path
MODES = ("configured", "library")
RARE = 99  # a category held by 1% of items (300), for selective filters
BROAD = frozenset(range(6))  # 59% of items (17.7k > exact_below): the library as configured too
NARROW = frozenset({0, 1, 2})  # 29% (8.8k): brute force as configured, the library when forced

_PATHS = ("unmasked", "removed", "removed+broad", "hidden", "upserted", "broad", "narrow", "rare")
FLOORS = {  # recall@k floors per backend and path: measured (module docstring) minus ~0.02-0.03
    "exact": dict.fromkeys(_PATHS, 1.0),
    "sharded": dict.fromkeys(_PATHS, 1.0),
    "hnsw": {
        "unmasked": 0.965,
        "removed": 0.96,
        "removed+broad": 0.97,
        "hidden": 0.965,
        "upserted": 0.965,
        "broad": 0.97,
        "narrow": 0.975,
        "rare": 0.87,
    },
    "ivfpq": {
        "unmasked": 0.775,
        "removed": 0.75,
        "removed+broad": 0.81,
        "hidden": 0.79,
        "upserted": 0.78,
        "broad": 0.83,
        "narrow": 0.88,
        "rare": 0.97,
    },
    "scann": {
        "unmasked": 0.93,
        "removed": 0.955,
        "removed+broad": 0.96,
        "hidden": 0.94,
        "upserted": 0.93,
        "broad": 0.95,
        "narrow": 0.955,
        "rare": 0.97,
    },
}
# Far cheaper than the defaults: recall there must land clearly below the unmasked floor, or the
# floor would not notice a backend that ignored the parameter.
CHEAP = {"hnsw": {"ef": 16}, "ivfpq": {"nprobe": 4}, "scann": {"leaves": 1}}
CHEAP_MARGIN = 0.02
# With a 1% mask on the library path these leave every library row short of k=100.
STARVED = {"hnsw": {"ef": 16}, "ivfpq": {"nprobe": 1, "rerank": 0}, "scann": {"leaves": 1, "reorder": 1}}


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _create(kind: str, **params):
    """A new index; a missing optional backend fails under CI (CI=true) and skips, with the reason, elsewhere."""
    try:
        return create(kind, D, **params)
    except BackendUnavailable as e:
        reason = f"the {kind} backend is unavailable: {e}"
        if os.environ.get("CI"):
            pytest.fail(reason + " - CI is set, so a missing backend is an error, not a skip")
        pytest.skip(reason)


class Catalog:
    """What an index should hold, in plain numpy: the oracle every search is checked against."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, categories: np.ndarray):
        self.vectors = np.asarray(vectors, np.float32)
        self.ids = np.asarray(ids, np.int64)
        self.cats = np.asarray(categories, np.int32)
        self.available = np.ones(len(self.ids), bool)

    def add(self, vectors, ids, categories) -> None:  # an id already present is replaced
        keep = ~np.isin(self.ids, ids)
        self.vectors = np.concatenate([self.vectors[keep], np.asarray(vectors, np.float32)])
        self.ids = np.concatenate([self.ids[keep], np.asarray(ids, np.int64)])
        self.cats = np.concatenate([self.cats[keep], np.asarray(categories, np.int32)])
        self.available = np.concatenate([self.available[keep], np.ones(len(ids), bool)])

    def remove(self, ids) -> None:
        keep = ~np.isin(self.ids, ids)
        self.vectors, self.ids, self.cats, self.available = (
            a[keep] for a in (self.vectors, self.ids, self.cats, self.available)
        )

    def set_available(self, ids, flag: bool) -> None:
        self.available[np.isin(self.ids, ids)] = flag

    def qualifying(self, cats: frozenset[int] | None = None) -> np.ndarray:
        ok = self.available.copy()
        if cats is not None:
            ok &= np.isin(self.cats, list(cats))
        return ok

    def truth(self, q: np.ndarray, k: int, cats: frozenset[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and float64 scores over the qualifying items (-1 / -inf padded)."""
        qual = np.flatnonzero(self.qualifying(cats))
        scores = q.astype(np.float64) @ self.vectors[qual].astype(np.float64).T
        kk = min(k, len(qual))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        ids = np.full((len(q), k), -1, np.int64)
        top = np.full((len(q), k), -np.inf)
        ids[:, :kk] = self.ids[qual][order]
        top[:, :kk] = np.take_along_axis(scores, order, axis=1)
        return ids, top

    def scores_of(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """True float64 inner products of each row's ids (which must be in the catalog) with its query."""
        order = np.argsort(self.ids)
        pos = order[np.searchsorted(self.ids[order], ids)]
        return np.einsum("md,mkd->mk", q.astype(np.float64), self.vectors[pos].astype(np.float64))


def _recall(catalog: Catalog, q: np.ndarray, ids: np.ndarray, k: int, cats: frozenset[int] | None = None) -> float:
    """Share of the k slots per row holding an id whose true score reaches the k-th best qualifying
    score (ties within 1e-5); at least k items must qualify."""
    valid = ids >= 0
    kth = catalog.truth(q, k, cats)[1][:, -1:]
    scores = np.where(valid, catalog.scores_of(q, np.where(valid, ids, catalog.ids[0])), -np.inf)
    return float((scores >= kth - 1e-5).sum() / (len(q) * k))


def _check(
    res, catalog: Catalog, q: np.ndarray, k: int, floor: float, what: str, cats: frozenset[int] | None = None
) -> float:
    """Every contract of one search result, against the oracle; returns recall@k."""
    m = len(q)
    qual = catalog.qualifying(cats)
    full = min(k, int(qual.sum()))
    assert res.ids.shape == (m, k) and res.scores.shape == (m, k), what
    assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32, what
    assert (res.ids[:, :full] >= 0).all(), f"{what}: every row must hold min(k, qualifying) = {full} results"
    assert (res.ids[:, full:] == -1).all() and np.isneginf(res.scores[:, full:]).all(), f"{what}: padding"
    got = res.ids[:, :full]
    assert all(len(set(row)) == full for row in got.tolist()), f"{what}: an id appears twice in a row"
    bad = ~np.isin(got, catalog.ids[qual])
    assert not bad.any(), (
        f"{what}: returned {np.unique(got[bad])[:10].tolist()}, which do not qualify (removed, hidden or filtered out)"
    )
    true = catalog.scores_of(q, got)
    np.testing.assert_allclose(
        res.scores[:, :full], true, atol=1e-4, err_msg=f"{what}: scores must be the current vectors' inner products"
    )
    assert (np.diff(res.scores[:, :full], axis=1) <= 1e-6).all(), f"{what}: rows must be sorted by score"
    r = _recall(catalog, q, got, full, cats)
    print(f"{what}: recall@{k} {r:.4f} (floor {floor})")
    assert r >= floor, f"{what}: recall@{k} {r:.4f} below the floor {floor}"
    return r


def _floor(index, path: str, catalog: Catalog, cats: frozenset[int] | None = None) -> float:
    """The floor of a masked search: 1.0 where the base class answers by brute force, else the backend's."""
    if int(catalog.qualifying(cats).sum()) <= index.search_defaults["exact_below"]:
        return 1.0
    return FLOORS[index.kind][path]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    centers = _norm(rng.standard_normal((CLUSTERS, D)))
    assign = rng.integers(0, CLUSTERS, N)
    vectors = _norm(centers[assign] + 0.25 * rng.standard_normal((N, D)))
    ids = rng.permutation(10 * N)[:N].astype(np.int64) + 1000  # sparse, unordered ids
    categories = rng.integers(0, 10, N).astype(np.int32)
    categories[rng.choice(N, N // 100, replace=False)] = RARE
    mix = rng.dirichlet(np.ones(3), NQ)
    picks = rng.integers(0, CLUSTERS, (NQ, 3))
    offset = _norm(rng.standard_normal((1, D)))
    queries = _norm((mix[:, :, None] * centers[picks]).sum(1) + 0.3 * offset + 0.15 * rng.standard_normal((NQ, D)))
    return {"vectors": vectors, "ids": ids, "categories": categories, "queries": queries}


@pytest.fixture
def catalog(data) -> Catalog:
    return Catalog(data["vectors"], data["ids"], data["categories"])


@pytest.fixture(scope="module", params=KINDS)
def built(request, data, tmp_path_factory):
    """One build per backend, published once; `index` tests load a fresh copy to mutate."""
    kind = request.param
    ix = _create(kind, **PARAMS[kind])
    ix.build(data["vectors"], data["ids"], data["categories"])
    broad = int(np.isin(data["categories"], list(BROAD)).sum())
    assert broad > ix.search_defaults["exact_below"], (
        f"the broad filter ({broad} items) must outgrow exact_below, or masked searches never reach the "
        "library as configured: grow N"
    )
    root = tmp_path_factory.mktemp(f"idx-{kind}")
    path = publish(ix, root, MODEL)
    return kind, ix, path


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def index(built, mode):
    """A fresh copy of the backend's snapshot; mode "library" sends every masked search through the library."""
    ix = load_snapshot(built[2])
    if mode == "library":
        ix.search_defaults["exact_below"] = 0
    return ix


# ---- unmasked searches (one path) -------------------------------------------------------------


def test_recall_floor_vs_exact(built, data, catalog):
    kind, ix, _ = built
    _check(ix.search(data["queries"], K), catalog, data["queries"], K, FLOORS[kind]["unmasked"], f"{kind} unmasked")


def test_exact_search_is_brute_force(built, data, catalog):
    kind, ix, _ = built
    q = data["queries"]
    _check(ix.exact_search(q, K), catalog, q, K, 1.0, f"{kind} exact_search")
    _check(ix.exact_search(q, K, filter=Filter(NARROW)), catalog, q, K, 1.0, f"{kind} exact_search narrow", NARROW)
    _check(
        ix.exact_search(q[:5], 400, filter=Filter(frozenset({RARE}))),
        catalog,
        q[:5],
        400,
        1.0,
        f"{kind} exact_search rare, k > qualifying",
        frozenset({RARE}),
    )


@pytest.mark.parametrize("built", LIBRARY_KINDS, indirect=True)
def test_search_params_matter(built, data, catalog):
    """A cheap setting must land clearly below the floor: the floor would catch a backend ignoring it."""
    kind, ix, _ = built
    q = data["queries"]
    cheap = _recall(catalog, q, ix.search(q, K, params=CHEAP[kind]).ids, K)
    default = _recall(catalog, q, ix.search(q, K).ids, K)
    print(f"{kind}: recall@{K} {cheap:.4f} with {CHEAP[kind]}, {default:.4f} with the defaults")
    assert cheap < FLOORS[kind]["unmasked"] - CHEAP_MARGIN, (
        f"{kind}: recall@{K} with {CHEAP[kind]} is {cheap:.4f}, not clearly below the floor "
        f"{FLOORS[kind]['unmasked']}: the search parameter has no effect, or the floor is too low to notice"
    )
    assert default > cheap + CHEAP_MARGIN


def test_single_query_matches_batch(built, data):
    kind, ix, _ = built
    q = data["queries"]
    # ScaNN itself picks a query's tree leaves slightly differently in a batch than alone (raw
    # search_batched, measured: ~5% of queries differ in a borderline item). With every leaf searched
    # (the widest setting of its search space) that choice is gone, so exact parity there shows
    # towerann's own path adds no difference.
    widest = max(ix.search_space(50), key=lambda s: s.get("leaves", 0))
    params = widest if kind == "scann" and widest.get("leaves") else None
    batch = ix.search(q, 50, params=params)
    for i in range(0, NQ, 7):
        single = ix.search(q[i], 50, params=params)  # a [d] query
        assert single.ids.shape == (1, 50)
        np.testing.assert_array_equal(single.ids[0], batch.ids[i])
        np.testing.assert_allclose(single.scores[0], batch.scores[i], atol=1e-5)
    if params:  # default leaves: the same items up to ScaNN's borderline leaves, scored identically
        batch = ix.search(q, 50)
        singles = [ix.search(x, 50) for x in q]
        overlap = np.mean([len(np.intersect1d(s.ids[0], ids)) / 50 for s, ids in zip(singles, batch.ids)])
        assert overlap >= 0.97
        for single, ids, scores in zip(singles, batch.ids, batch.scores):
            by_id = dict(zip(ids.tolist(), scores.tolist()))
            common = [(by_id[j], s) for j, s in zip(single.ids[0].tolist(), single.scores[0].tolist()) if j in by_id]
            np.testing.assert_allclose(*zip(*common), atol=1e-5)


def test_save_load_round_trip(built, data):
    _, ix, path = built
    copy = load_snapshot(path)
    before, after = ix.search(data["queries"], K), copy.search(data["queries"], K)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_allclose(before.scores, after.scores, atol=1e-6)
    assert len(copy) == len(ix) == N
    assert copy.describe() == ix.describe()
    assert copy.search_defaults == ix.search_defaults


@pytest.mark.parametrize("kind", KINDS)
def test_padding_when_k_exceeds_items(kind, data):
    ix = _create(kind)
    ix.build(data["vectors"][:50], data["ids"][:50])
    res = ix.search(data["queries"][:3], 80)
    assert res.ids.shape == (3, 80)
    assert (res.ids[:, :50] >= 0).all() and (res.ids[:, 50:] == -1).all()
    assert np.isneginf(res.scores[:, 50:]).all() and np.isfinite(res.scores[:, :50]).all()
    assert set(res.ids[0, :50]) == set(data["ids"][:50])


# ---- mutations and filters, as configured and forced through the library -----------------------


def test_incremental_add_is_found(index, data, catalog, mode):
    q = data["queries"]
    rng = np.random.default_rng(7)
    new = _norm(q[:10] + 0.01 * rng.standard_normal((10, D)))
    new_ids = np.arange(10, dtype=np.int64) + 10**9
    index.add(new, new_ids, categories=np.zeros(10, np.int32))
    catalog.add(new, new_ids, np.zeros(10, np.int32))
    assert len(index) == N + 10
    tag = f"{index.kind}/{mode} after add"
    np.testing.assert_array_equal(index.search(q[:10], 5).ids[:, 0], new_ids)
    _check(index.search(q, K), catalog, q, K, FLOORS[index.kind]["unmasked"], tag)
    res = index.search(q, K, filter=Filter(NARROW))
    np.testing.assert_array_equal(res.ids[:10, 0], new_ids)
    _check(res, catalog, q, K, _floor(index, "narrow", catalog, NARROW), tag + ", narrow filter", NARROW)
    gone = new_ids[::2]  # new items removed again (on ScaNN: from its delta tier)
    index.remove(gone)
    catalog.remove(gone)
    res = index.search(q, K)
    np.testing.assert_array_equal(res.ids[1:10:2, 0], new_ids[1::2])
    _check(res, catalog, q, K, _floor(index, "unmasked", catalog), tag + " and remove")


def test_upsert_replaces_the_old_vector(index, data, catalog, mode):
    q = data["queries"]
    victims = np.unique(catalog.truth(q[:20], 10)[0])  # the best answers move to the far side
    order = np.argsort(catalog.ids)
    pos = order[np.searchsorted(catalog.ids[order], victims)]
    rng = np.random.default_rng(11)
    far = _norm(-catalog.vectors[pos] + 0.05 * rng.standard_normal((len(victims), D)))
    cats = catalog.cats[pos]
    index.add(far, victims, categories=cats)
    catalog.add(far, victims, cats)
    assert len(index) == N
    tag = f"{index.kind}/{mode} after upsert"
    assert not np.isin(catalog.truth(q[:20], 10)[0], victims).any()  # the oracle agrees: they left these rows
    res = index.search(q[:20], 10)
    assert not np.isin(res.ids, victims).any(), f"{tag}: an old vector was returned"  # it was these rows' top 10
    res = index.search(q, K)  # a victim may be returned, for its new vector: its score says which
    _check(res, catalog, q, K, _floor(index, "upserted", catalog), tag)
    res = index.search(far[:10], 1)
    np.testing.assert_array_equal(res.ids[:, 0], victims[:10])
    np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-4)


def test_removed_items_never_return(index, data, catalog, mode):
    q = data["queries"]
    top = catalog.truth(q, 30)[0]  # the best answers are the ones that must disappear
    gone = np.unique(np.concatenate([top.ravel(), data["ids"][:1000]]))
    index.remove(gone)
    index.remove(gone[:5])  # idempotent
    catalog.remove(gone)
    assert len(index) == N - len(gone) and int(gone[0]) not in index
    tag = f"{index.kind}/{mode} after remove"
    res = index.search(q, K)
    assert not np.isin(res.ids, gone).any(), f"{tag}: a removed item was returned"
    _check(res, catalog, q, K, _floor(index, "removed", catalog), tag)
    _check(index.search(q[:10], 1000), catalog, q[:10], 1000, 0.0, tag + ", k=1000")  # exactly k, all live
    _check(
        index.search(q, K, filter=Filter(BROAD)),
        catalog,
        q,
        K,
        _floor(index, "removed+broad", catalog, BROAD),
        tag + ", broad filter",
        BROAD,
    )


def test_set_available_false_then_true(index, data, catalog, mode):
    q = data["queries"]
    before = index.search(q, 50)
    rng = np.random.default_rng(5)
    some = rng.choice(data["ids"], N // 5, replace=False)
    hidden = np.unique(np.concatenate([catalog.truth(q, 10)[0].ravel(), some]))  # the best answers + 20%
    index.set_available(hidden, False)
    catalog.set_available(hidden, False)
    assert len(index) == N  # hidden, not removed
    tag = f"{index.kind}/{mode} after hiding"
    res = index.search(q, K)
    assert not np.isin(res.ids, hidden).any(), f"{tag}: a hidden item was returned"
    _check(res, catalog, q, K, _floor(index, "hidden", catalog), tag)
    index.set_available(hidden, True)
    again = index.search(q, 50)
    np.testing.assert_array_equal(again.ids, before.ids)
    np.testing.assert_allclose(again.scores, before.scores, atol=1e-6)


@pytest.mark.parametrize("which", ["broad", "narrow"])
def test_category_filter(index, data, catalog, mode, which):
    cats = BROAD if which == "broad" else NARROW
    res = index.search(data["queries"], K, filter=Filter(categories=cats))
    _check(
        res,
        catalog,
        data["queries"],
        K,
        _floor(index, which, catalog, cats),
        f"{index.kind}/{mode} {which} filter",
        cats,
    )


def test_selective_filter_returns_exactly_k(index, data, catalog, mode):
    q = data["queries"]
    rare = frozenset({RARE})  # 1% of items
    res = index.search(q, 40, filter=Filter(rare))
    _check(res, catalog, q, 40, _floor(index, "rare", catalog, rare), f"{index.kind}/{mode} rare filter", rare)
    short = index.search(q[:5], 400, filter=Filter(rare))  # only 300 qualify: 300 results, then padding
    _check(short, catalog, q[:5], 400, 1.0, f"{index.kind}/{mode} rare filter, k > qualifying", rare)


@pytest.mark.parametrize("built", LIBRARY_KINDS, indirect=True)
@pytest.mark.parametrize("masked_by", ["filter", "availability"])
def test_library_shortfall_falls_back_to_exact(built, data, catalog, masked_by):
    """A 1% mask on the library path with starved settings: the library comes up short on every row,
    and the rows must still be complete and exactly the brute-force answer."""
    kind, _, path = built
    ix = load_snapshot(path)
    ix.search_defaults["exact_below"] = 0
    q = data["queries"]
    keep = data["ids"][data["categories"] == RARE]
    if masked_by == "filter":
        flt, cats = Filter(frozenset({RARE})), frozenset({RARE})
    else:  # no filter: only removed/unavailable items are masked
        hide = np.setdiff1d(data["ids"], keep)
        ix.set_available(hide, False)
        catalog.set_available(hide, False)
        flt, cats = None, None
    res = ix.search(q, K, filter=flt, params=STARVED[kind])
    assert res.short_rows > 0, f"{kind}: the library never came up short, so this test does not exercise the fallback"
    _check(res, catalog, q, K, 1.0, f"{kind} shortfall ({masked_by})", cats)
    exact = ix.exact_search(q, K, filter=flt)
    np.testing.assert_array_equal(res.ids, exact.ids)
    np.testing.assert_allclose(res.scores, exact.scores, atol=1e-6)


def test_mismatched_snapshot_is_refused(built, tmp_path):
    _, ix, path = built
    with pytest.raises(IndexIncompatible, match="model-v2"):
        load_snapshot(path, expected_model_version="model-v2")
    with pytest.raises(IndexIncompatible, match="dim"):
        load_snapshot(path, expected_dim=D * 2)
    assert len(load(path, expected_model_version=MODEL, expected_dim=D)) == N
    root = tmp_path / "root"
    tampered = publish(ix, root, MODEL)
    target = next(tampered.rglob("slot_ids.npy"))  # a sharded snapshot has one per shard
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        load(root)
    target.write_bytes(Path(path / target.relative_to(tampered)).read_bytes())
    (tampered / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="differ from the manifest"):
        load(root)

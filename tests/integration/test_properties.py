"""Tests that try to break it (Hypothesis): whatever a request carries, the answer is never a 5xx and a
4xx is always JSON with "error"; whatever small index and query, the index contract holds or the call
is refused with BadRequest - never a crash. Examples are few (seconds per test), deadlines off."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from towerann.errors import BadRequest, TowerannError
from towerann.index import Filter, create

TOKEN = "property-token-51aa"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---- the HTTP handlers ----------------------------------------------------------------------------

huge_ints = st.sampled_from([2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 10**20, 10**40, -(10**30)])
floats = st.floats(allow_nan=True, allow_infinity=True)
ids = st.one_of(
    st.text(max_size=40),
    st.text(min_size=250, max_size=300),
    st.integers(-(2**70), 2**70),
    huge_ints,
    floats,
    st.booleans(),
    st.none(),
    st.sampled_from(["3", "5", "007", "-1", " 5", "5 ", "\x00", "١٢٣", "9223372036854775808", "e" * 257]),
)
scalars = st.one_of(
    ids, st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)
ks = st.one_of(st.integers(-5, 300), huge_ints, floats, st.text(max_size=3), st.booleans(), st.none())
filters = st.one_of(
    st.none(),
    st.builds(
        lambda c: {"categories": c},
        st.one_of(
            st.lists(
                st.one_of(st.sampled_from(["cat_0001", "cat_0002"]), st.text(max_size=12), st.integers()), max_size=4
            ),
            scalars,
        ),
    ),
    st.dictionaries(st.text(max_size=8), scalars, max_size=2),
)


def maybe(key: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just({}), values.map(lambda v: {key: v}))


candidates_bodies = st.one_of(
    st.builds(
        lambda a, b, c, extra: {**a, **b, **c, **extra},
        maybe("user_id", ids),
        maybe("k", ks),
        maybe("filter", filters),
        st.dictionaries(st.sampled_from(["x", "K", "user"]), scalars, max_size=1),
    ),
    scalars,
)
event_bodies = st.builds(
    lambda a, b, c, d: {**a, **b, **c, **d},
    maybe("user_id", ids),
    maybe("item_id", ids),
    maybe("type", ids),
    maybe("ts", st.one_of(floats, huge_ints, st.text(max_size=3), st.floats(1.7e9, 1.9e9))),
)
item_rows = st.dictionaries(
    st.sampled_from(["item_id", "category", "available", "price", "quality", "brand", "x"]),
    st.one_of(ids, floats, st.integers(), st.booleans()),
    max_size=7,
)
# A valid row of the synthetic catalog (item tower: price, quality, brand) with one field replaced: these get
# past the first checks, down to the embedding and the index, where the 500s were.
TEMPLATE = {
    "item_id": "777001",
    "category": "cat_0001",
    "available": True,
    "price": 12.5,
    "quality": 0.5,
    "brand": "b0001_00",
}
nasty = st.one_of(
    huge_ints,
    ids,
    floats,
    st.sampled_from(
        [1e300, -1e300, 10**20, 2**63, "9223372036854775808", "-9223372036854775809", "", "x" * 300, None, [], {}]
    ),
)
near_valid_rows = st.builds(
    lambda key, value, item: {**TEMPLATE, "item_id": item, key: value},
    st.sampled_from(["item_id", "price", "quality", "category", "brand", "available"]),
    nasty,
    st.integers(700_000, 799_999).map(str),
)
item_bodies = st.one_of(
    st.builds(lambda rows: {"items": rows}, st.lists(near_valid_rows, min_size=1, max_size=2)),
    st.builds(lambda rows: {"items": rows}, st.lists(item_rows, max_size=3)),
    scalars,
)


def body_bytes(body: Any) -> bytes:
    """Python's JSON (NaN, Infinity and huge integers included), as a careless client sends it."""
    return json.dumps(body, allow_nan=True).encode()


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], r.text[:300]


@pytest.fixture(scope="module")
def http(serving_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
    from towerann.freshness.publish import publish_bundle
    from towerann.server.server import start_background

    paths = serving_bundle
    tmp = tmp_path_factory.mktemp("properties")
    publish_bundle(tmp / "indexes", paths["model"], paths["vectors"], kind="exact")  # writes go to a root of its own
    (tmp / "token").write_text(TOKEN)
    handle = start_background(
        Config(
            serve=ServeConfig(max_k=200, max_items_per_write=5),
            paths=PathsConfig(index=str(tmp / "indexes"), model=str(paths["model"])),
            features=FeaturesConfig(store="memory", path=""),
            freshness=FreshnessConfig(
                adopt_log=True, delta_path=str(tmp / "delta.sqlite"), token_file=str(tmp / "token"), poll_s=0.0
            ),
        )
    )
    with httpx.Client(base_url=handle.url, timeout=30, headers={"content-type": "application/json"}) as client:
        yield client
        assert client.get("/healthz").status_code == 200  # and it still serves
    handle.stop()


@SETTINGS
@given(body=candidates_bodies)
@example(body={"user_id": 42, "k": 5})  # the cases first, then Hypothesis's own
@example(body={"user_id": 2**63, "k": 10**20})
@example(body={"user_id": "3", "k": float("nan")})
@example(body={"user_id": "3", "k": 5, "filter": {"categories": [10**30, None, "x" * 300]}})
def test_candidates_never_5xx(http: httpx.Client, body: Any) -> None:
    r = http.post("/v1/candidates", content=body_bytes(body))
    check(r)
    if r.status_code == 200:
        got = r.json()
        assert 1 <= len(got["candidates"]) <= body["k"] and got["degraded"] is False
        scores = [c["score"] for c in got["candidates"]]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)


@SETTINGS
@given(body=event_bodies)
@example(body={"user_id": "3", "item_id": "9223372036854775808"})
@example(body={"user_id": "3", "item_id": -(2**63) - 1})
@example(body={"user_id": "3", "item_id": "5", "ts": 1e300})
@example(body={"user_id": "3", "item_id": "5", "ts": float("inf")})
def test_events_never_5xx(http: httpx.Client, body: Any) -> None:
    check(http.post("/v1/events", content=body_bytes(body)))


@SETTINGS
@given(body=item_bodies, token=st.sampled_from([True, True, True, False]))
@example(body={"items": [{**TEMPLATE, "item_id": "9223372036854775808"}]}, token=True)
@example(body={"items": [{**TEMPLATE, "item_id": "777002", "price": 10**20}]}, token=True)
@example(body={"items": [{**TEMPLATE, "item_id": "777003", "price": 10**400}]}, token=True)
@example(body={"items": [{**TEMPLATE, "item_id": "777004", "price": 1e300}]}, token=True)
@example(body={"items": [{**TEMPLATE, "item_id": "777005", "quality": float("nan")}]}, token=True)
def test_item_writes_never_5xx(http: httpx.Client, body: Any, token: bool) -> None:
    check(http.post("/v1/items", content=body_bytes(body), headers=AUTH if token else {}))


@SETTINGS
@given(
    item_id=st.one_of(
        st.text(min_size=1, max_size=30).filter(lambda s: "/" not in s and "?" not in s and "#" not in s),
        st.integers(-(2**70), 2**70).map(str),
    ),
    available=st.one_of(st.booleans(), ids),
    delete=st.booleans(),
)
@example(item_id="9223372036854775808", available=False, delete=False)
@example(item_id="-9223372036854775809", available=True, delete=True)
def test_patch_and_delete_never_5xx(http: httpx.Client, item_id: str, available: Any, delete: bool) -> None:
    from urllib.parse import quote

    path = "/v1/items/" + quote(item_id, safe="")
    r = (
        http.delete(path, headers=AUTH)
        if delete
        else http.patch(path, content=body_bytes({"available": available}), headers=AUTH)
    )
    check(r)


# ---- the index contract ---------------------------------------------------------------------------

KINDS = ("exact", "hnsw", "ivfpq")


@st.composite
def small_indexes(draw: st.DrawFn) -> tuple[Any, dict[int, tuple[int, bool]], np.ndarray]:
    """An index of 0..40 items (built in one batch or two, some removed or hidden), and its truth."""
    kind = draw(st.sampled_from(KINDS))
    dim = draw(st.sampled_from([4, 8]))
    n = draw(st.integers(0, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)
    item_ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    cats = rng.integers(0, 3, n).astype(np.int32)
    avail = rng.random(n) > 0.2
    index = create(kind, dim)
    split = draw(st.integers(0, n))
    index.build(vectors[:split], item_ids[:split], cats[:split], avail[:split])
    index.add(vectors[split:], item_ids[split:], cats[split:], avail[split:])
    truth = {int(i): (int(c), bool(a)) for i, c, a in zip(item_ids, cats, avail)}
    for i in draw(st.lists(st.sampled_from(item_ids.tolist()), max_size=5)) if n else []:
        if draw(st.booleans()):
            index.remove([i])
            truth.pop(int(i), None)
        else:
            visible = draw(st.booleans())
            index.set_available([i], visible)
            if int(i) in truth:
                truth[int(i)] = (truth[int(i)][0], visible)
    return index, truth, vectors


@settings(max_examples=80, deadline=None, database=None)
@given(
    case=small_indexes(),
    k=st.integers(1, 60),
    categories=st.one_of(st.none(), st.sets(st.integers(0, 3))),
    m=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_index_search_keeps_its_contract(case: Any, k: int, categories: set[int] | None, m: int, seed: int) -> None:
    index, truth, _ = case
    q = np.random.default_rng(seed).normal(size=(m, index.dim)).astype(np.float32)
    flt = None if categories is None else Filter(categories=frozenset(categories))
    res = index.search(q, k, filter=flt)
    qualifying = {i for i, (c, a) in truth.items() if a and (categories is None or c in categories)}
    assert res.ids.shape == res.scores.shape == (m, k)
    for row_ids, row_scores in zip(res.ids, res.scores):
        found = row_ids[row_ids >= 0]
        assert len(found) == min(k, len(qualifying)), (len(found), k, len(qualifying))
        assert set(found.tolist()) <= qualifying and len(set(found.tolist())) == len(found)
        assert (row_ids[len(found) :] == -1).all() and np.isneginf(row_scores[len(found) :]).all()
        assert (np.diff(row_scores[: len(found)]) <= 1e-6).all()  # best first
    assert len(index) == len(truth)


@settings(max_examples=40, deadline=None, database=None)
@given(
    case=small_indexes(),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.sampled_from(["query", "add"]),
    k=st.one_of(st.integers(1, 20), st.sampled_from([0, -1, True, 2.0, None, "5"])),
)
def test_non_finite_vectors_and_bad_k_are_bad_requests(case: Any, bad: float, where: str, k: Any) -> None:
    index, truth, _ = case
    vec = np.ones((1, index.dim), np.float32)
    vec[0, 0] = bad
    good_k = isinstance(k, int) and not isinstance(k, bool) and k > 0
    with pytest.raises(TowerannError) as e:
        if where == "query" or not good_k:
            index.search(vec if where == "query" else np.ones((1, index.dim), np.float32), k)
        else:
            index.add(vec, np.array([999_999]), np.array([0]), np.array([True]))
    assert isinstance(e.value, BadRequest)
    assert len(index) == len(truth) and 999_999 not in index  # a refused call changes nothing

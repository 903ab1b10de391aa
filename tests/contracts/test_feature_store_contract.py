"""The FeatureStore contract, written once and run against every backend (embedded, redis)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from towerann.errors import BadRequest, DataError
from towerann.features import Event, FeatureStore, open_store

MakeStore = Callable[..., FeatureStore]


@pytest.fixture(params=["embedded", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path) -> MakeStore:
    """A factory of fresh stores of one backend; every store made is closed after the test."""
    opened: list[FeatureStore] = []

    def make(**kw) -> FeatureStore:
        if request.param == "embedded":
            store = open_store("embedded", path=tmp_path / f"features-{len(opened)}.sqlite", **kw)
        else:
            url = request.getfixturevalue("redis_server")
            store = open_store(url, prefix=request.getfixturevalue("redis_prefix") + f"{len(opened)}:", **kw)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def test_static_features_round_trip(make_store: MakeStore) -> None:
    store = make_store()
    assert isinstance(store, FeatureStore)
    n = store.put_users(
        [
            {
                "user_id": "u1",
                "age": 31,
                "score": 0.25,
                "country": "fr",
                "missing": None,
                "recent_items": ["i3", "i2", "i1"],
            },
            {"user_id": "u2", "age": 40.5},
        ]
    )
    assert n == 2
    u1 = store.get_one("u1")
    assert u1.known and u1.user_id == "u1"
    assert u1.static == {"age": 31.0, "score": 0.25, "country": "fr"}  # None means missing: dropped
    assert isinstance(u1.static["age"], float) and isinstance(u1.static["country"], str)
    assert u1.recent_items == ("i3", "i2", "i1")
    assert store.get_one("u2").recent_items == ()
    # a new row replaces the whole record
    store.put_users([{"user_id": "u1", "country": "de"}])
    again = store.get_one("u1")
    assert again.static == {"country": "de"} and again.recent_items == ()
    assert store.stats()["users"] == 2


def test_unknown_user_is_empty_but_has_its_session(make_store: MakeStore) -> None:
    store = make_store()
    f = store.get_one("nobody")
    assert (f.known, f.static, f.recent_items, f.session) == (False, {}, (), ())
    store.append_event(Event("nobody", "i9", ts=1000.0))
    f = store.get_one("nobody", now=1001.0)
    assert not f.known and [e.item_id for e in f.session] == ["i9"]


def test_read_your_writes_newest_first(make_store: MakeStore) -> None:
    store = make_store()
    store.put_users([{"user_id": "u1", "age": 1}])
    stored = store.append_event(Event("u1", "a"))  # ts 0 -> now
    assert stored.ts > 1e9 and (stored.user_id, stored.item_id, stored.type) == ("u1", "a", "click")
    assert store.get_one("u1").session == (stored,)  # visible at once, same object contents
    second = store.append_event(Event("u1", "b", type="add_to_cart"))
    assert [e.item_id for e in store.get_one("u1").session] == ["b", "a"]
    assert store.get_one("u1").session[0] == second
    # explicit timestamps order the session, whatever the arrival order
    assert (
        store.append_events([Event("u2", "x", ts=2000.0), Event("u2", "y", ts=3000.0), Event("u2", "w", ts=1000.0)])
        == 3
    )
    assert [e.item_id for e in store.get_one("u2", now=3001.0).session] == ["y", "x", "w"]


def test_session_capped_to_max_events(make_store: MakeStore) -> None:
    store = make_store(max_events=5)
    assert store.max_events == 5
    for i in range(8):
        store.append_event(Event("u1", f"i{i}", ts=1000.0 + i))
    store.append_events([Event("u1", "j8", ts=1008.0), Event("u1", "j9", ts=1009.0)])
    session = store.get_one("u1", now=1010.0).session
    assert [e.item_id for e in session] == ["j9", "j8", "i7", "i6", "i5"]


def test_ttl_hides_old_events(make_store: MakeStore) -> None:
    store = make_store(ttl_s=600)
    for ts in (1000.0, 1500.0, 2000.0):
        store.append_event(Event("u1", f"at{int(ts)}", ts=ts))
    assert [e.item_id for e in store.get_one("u1", now=1600.0).session] == ["at2000", "at1500", "at1000"]
    assert [e.item_id for e in store.get_one("u1", now=2100.0).session] == ["at2000", "at1500"]
    assert [e.item_id for e in store.get_one("u1", now=2600.0).session] == ["at2000"]
    assert store.get_one("u1", now=2601.0).session == ()
    assert store.get(["u1"], now=2601.0)[0].session == ()


def test_batch_get_keeps_input_order(make_store: MakeStore) -> None:
    store = make_store()
    store.put_users({"user_id": f"u{i}", "rank": i} for i in range(0, 40, 2))  # a generator works too
    for i in range(0, 40, 3):
        store.append_event(Event(f"u{i}", f"item{i}", ts=5000.0))
    ids = [f"u{i}" for i in range(39, -1, -1)] + ["u4", "ghost"]
    got = store.get(ids, now=5001.0)
    assert [f.user_id for f in got] == ids
    for f in got:
        i = int(f.user_id[1:]) if f.user_id != "ghost" else 1
        assert f.known == (f.user_id != "ghost" and i % 2 == 0)
        assert f.static == ({"rank": float(i)} if f.known else {})
        assert [e.item_id for e in f.session] == ([f"item{i}"] if f.user_id != "ghost" and i % 3 == 0 else [])
    assert store.get([]) == []


def test_concurrent_appends_lose_nothing(make_store: MakeStore) -> None:
    store = make_store(max_events=1000)
    n_threads, per_thread = 8, 40
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                store.append_event(Event("shared", f"t{t}-{j}"))  # all threads on one user
                store.append_event(Event(f"own{t}", f"t{t}-{j}"))  # and one user each
        except BaseException as e:  # surfaced below, so a failing thread fails the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    shared = store.get_one("shared").session
    assert len(shared) == n_threads * per_thread
    assert {e.item_id for e in shared} == {f"t{t}-{j}" for t in range(n_threads) for j in range(per_thread)}
    for t in range(n_threads):
        own = store.get_one(f"own{t}").session
        assert [e.item_id for e in own] == [f"t{t}-{j}" for j in reversed(range(per_thread))]


def test_ids_are_strings(make_store: MakeStore) -> None:
    store = make_store()
    store.put_users([{"user_id": "7", "v": 1}, {"user_id": "007", "v": 2}, {"user_id": "ユーザー:1 x", "v": 3}])
    store.append_event(Event("007", "42", ts=10.0))
    got = store.get(["7", "007", "ユーザー:1 x"], now=11.0)
    assert [f.static["v"] for f in got] == [1.0, 2.0, 3.0]  # "7" and "007" are different users
    assert got[0].session == () and got[1].session == (Event("007", "42", "click", 10.0),)
    assert isinstance(got[1].session[0].item_id, str)
    with pytest.raises(BadRequest, match="str"):
        store.get_one(7)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="user_id"):
        store.get(["7", 8])  # type: ignore[list-item]
    with pytest.raises(BadRequest, match="item_id"):
        store.append_event(Event("7", 42))  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="user_id"):
        store.put_users([{"user_id": 7}])
    with pytest.raises(DataError, match="user_id"):
        store.put_users([{"id": "7"}])
    with pytest.raises(DataError, match="feature 'tags'"):
        store.put_users([{"user_id": "9", "tags": ["a"]}])
    assert store.get_one("9").known is False  # a rejected batch writes nothing

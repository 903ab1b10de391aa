"""What unauthenticated traffic can make a server keep is bounded: ids, event times, session users."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from towerann.errors import BadRequest, ConfigError, NotFound
from towerann.features import Event
from towerann.features.embedded import EmbeddedFeatureStore


def test_the_embedded_store_keeps_the_sessions_of_at_most_max_session_users(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    store = EmbeddedFeatureStore(path, max_session_users=3)
    for user in ("a", "b", "c"):
        store.append_event(Event(user, "i1"))
    store.append_event(Event("a", "i2"))  # a is active again: b is now the least recently active
    store.append_event(Event("d", "i1"))
    assert store.get_one("b").session == () and len(store.get_one("a").session) == 2
    assert store.stats()["session_users"] == 3 and store.stats()["evicted_sessions"] == 1
    store.append_events([Event(f"n{i}", "i1") for i in range(5)])  # one batch of more users than the cap
    assert store.stats()["session_users"] == 3
    store.close()
    again = EmbeddedFeatureStore(path, max_session_users=3)  # the file was trimmed alike
    assert again.stats()["session_users"] == 3
    assert all(again.get_one(u).session == () for u in ("a", "b", "c", "d"))
    again.close()
    smaller = EmbeddedFeatureStore(path, max_session_users=1)  # opened with a smaller cap: trimmed on open
    assert smaller.stats()["session_users"] == 1
    smaller.close()
    import sqlite3

    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(DISTINCT user_id) FROM events").fetchone()[0] == 1
    db.close()
    with pytest.raises(ConfigError, match="max_session_users"):
        EmbeddedFeatureStore(None, max_session_users=0)


@pytest.fixture(scope="module")
def retriever(serving_bundle: dict[str, Path]):  # type: ignore[no-untyped-def]
    from towerann.features import open_store
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    paths = serving_bundle
    return Retriever(
        BundleHolder(RetrievalBundle.load(paths["index"])),
        open_store("memory", ttl_s=3600),
        max_k=100,
        max_id_length=32,
        max_clock_skew_s=60,
    )


def test_the_python_api_has_the_same_limits(retriever) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest, match="at most 32"):
        retriever.candidates("u" * 33, 5)
    with pytest.raises(BadRequest, match="at most 32"):
        retriever.record_event("u", "5", "t" * 33)
    now = time.time()
    for ts in (now + 120, now - 7200, 1e300, float("nan"), float("inf")):
        with pytest.raises(BadRequest, match="ts"):
            retriever.record_event("u", "5", ts=ts)
    assert retriever.record_event("u", "5", ts=now - 10).ts == now - 10
    assert retriever.record_event(7, 5).user_id == "7"  # integer ids: the decimal spelling
    assert retriever.candidates(7, 5).item_ids
    for bad in ("9223372036854775808", 2**63, -(2**63) - 1, 10**25):
        with pytest.raises(NotFound):
            retriever.record_event("u", bad)
    with pytest.raises(BadRequest):
        retriever.candidates(True, 5)  # type: ignore[arg-type]


def test_a_store_that_is_down_degrades_candidates_in_the_python_api_too(retriever) -> None:  # type: ignore[no-untyped-def]
    from towerann.errors import BackendUnavailable
    from towerann.serving.retriever import Retriever

    class Down(type(retriever.store)):  # type: ignore[misc]
        def get_one(self, user_id, now=None):  # type: ignore[no-untyped-def]
            raise BackendUnavailable("down")

    r = Retriever(retriever.holder, Down(None), max_k=100)
    c = r.candidates("3", 10)
    cold = r.candidates("never-seen-user", 10)
    assert c.degraded and len(c.item_ids) == 10
    assert cold.degraded

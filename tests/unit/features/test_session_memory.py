"""The embedded store's sessions live within a memory budget ([features] session_memory_mb): clicks
from ever new user ids (no token needed) evict the least recently active sessions instead of growing
the process. The budget is kept on an estimate per session and per event; tracemalloc checks that the
estimate does not undercount what Python really holds."""

from __future__ import annotations

import gc
import time
import tracemalloc
from pathlib import Path

import pytest

from towerann.config import FeaturesConfig, load_config
from towerann.errors import ConfigError
from towerann.features.embedded import EmbeddedFeatureStore
from towerann.features.store import Event


def _grow(store: EmbeddedFeatureStore, users: int, per_user: int, id_len: int) -> int:
    """Clicks of `users` new users, `per_user` each; returns the bytes Python allocated for them."""
    pad = "x" * max(0, id_len - 9)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    now = time.time()
    for u in range(users):
        store._append(
            [Event(f"u{u:08d}{pad}", f"i{(u * 7 + j) % 99991:08d}{pad}", "click", now) for j in range(per_user)]
        )
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return grown


@pytest.mark.parametrize("per_user, id_len", [(1, 12), (50, 12), (1, 200), (20, 200)])
def test_the_estimate_covers_what_python_holds(per_user: int, id_len: int) -> None:
    store = EmbeddedFeatureStore(None, max_events=50, max_session_users=10**7)
    measured = _grow(store, 4000 // per_user, per_user, id_len)
    estimate = store.stats()["session_bytes"]
    assert measured <= estimate <= 1.6 * measured, (measured, estimate)


def test_clicks_of_new_users_stay_within_the_budget(tmp_path: Path) -> None:
    store = EmbeddedFeatureStore(tmp_path / "f.sqlite", max_events=50, session_memory_mb=0.05)  # 52 KB
    now = time.time()
    for u in range(2000):
        store.append_events([Event(f"user-{u}", "item-1", "click", now)])
    stats = stats_after = store.stats()
    assert stats["session_bytes"] <= stats["max_session_bytes"] == int(0.05 * (1 << 20))
    assert 0 < stats["session_users"] < 2000 and stats["evicted_sessions"] == 2000 - stats["session_users"]
    assert store.get_one("user-1999").session and not store.get_one("user-0").session  # the oldest went
    store.close()
    reopened = EmbeddedFeatureStore(tmp_path / "f.sqlite", max_events=50, session_memory_mb=0.05)
    stats_after = reopened.stats()
    assert stats_after["session_users"] == stats["session_users"]  # the file was trimmed alike
    reopened.close()


def test_a_long_session_counts_its_events(tmp_path: Path) -> None:
    store = EmbeddedFeatureStore(None, max_events=50, session_memory_mb=1.0)
    now = time.time()
    store.append_events([Event("one", f"item-{j}", "click", now) for j in range(200)])  # capped at 50 events
    one = store.stats()["session_bytes"]
    store.append_events([Event("two", "item-0", "click", now)])
    assert store.stats()["session_bytes"] - one < one / 10  # a one-click session costs a fraction of a full one
    store.purge_expired(now + 10 * store.ttl_s)
    assert store.stats()["session_bytes"] == 0


def test_the_budget_is_configured_and_checked(tmp_path: Path) -> None:
    assert FeaturesConfig().session_memory_mb == 1024.0
    cfg = tmp_path / "t.toml"
    cfg.write_text("[features]\nsession_memory_mb = 0\n")
    with pytest.raises(ConfigError, match="session_memory_mb"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="session_memory_mb"):
        EmbeddedFeatureStore(None, session_memory_mb=-1)

"""Redis store specifics: key layout, server-side capping and expiry, unreachable servers."""

from __future__ import annotations

import time

import pytest
import redis

from towerann.errors import BackendUnavailable, ConfigError
from towerann.features import Event, open_store
from towerann.features.redis_store import RedisFeatureStore


def test_connection_refused_is_backend_unavailable(free_port: int) -> None:
    url = f"redis://127.0.0.1:{free_port}/0"
    with pytest.raises(BackendUnavailable, match=rf"127\.0\.0\.1:{free_port}.*redis-server running"):
        open_store(url)


def test_key_layout_cap_and_expiry_live_in_redis(redis_server: str, redis_prefix: str) -> None:
    store = RedisFeatureStore(redis_server, prefix=redis_prefix, max_events=4, ttl_s=30)
    store.put_users([{"user_id": "u1", "age": 3, "city": "Oslo", "recent_items": ["a", "b"]}])
    for i in range(10):
        store.append_event(Event("u1", f"i{i}"))
    raw = redis.Redis.from_url(redis_server, decode_responses=True)
    try:
        assert raw.hgetall(f"{redis_prefix}u:u1") == {"age": "3.0", "city": '"Oslo"', "recent_items": '["a", "b"]'}
        assert raw.llen(f"{redis_prefix}s:u1") == 4  # trimmed on the server, not only on read
        assert 0 < raw.pttl(f"{redis_prefix}s:u1") <= 30_000  # expires ttl_s after the last event
    finally:
        raw.close()
    assert store.stats()["users"] == 1 and store.stats()["session_users"] == 1
    assert store.clear() == 2
    assert store.get_one("u1").known is False
    store.close()


def test_prefixes_are_separate_namespaces(redis_server: str, redis_prefix: str) -> None:
    a = open_store(redis_server, prefix=redis_prefix + "a:")
    b = open_store(redis_server, prefix=redis_prefix + "b:")
    a.put_users([{"user_id": "u", "x": 1}])
    a.append_event(Event("u", "i"))
    fb = b.get_one("u")
    assert (fb.known, fb.session) == (False, ())
    assert a.get_one("u").known
    a.close()
    b.close()
    with pytest.raises(ConfigError, match="--path"):
        open_store(redis_server, path="x.sqlite")


def test_server_going_away_is_backend_unavailable(free_port: int, spawn_redis) -> None:
    proc = spawn_redis(free_port, "--appendonly", "no")
    try:
        url = f"redis://127.0.0.1:{free_port}/0"
        for _ in range(200):  # wait until it answers
            try:
                store = open_store(url, prefix="gone:")
                break
            except BackendUnavailable:
                time.sleep(0.05)
        else:
            pytest.fail("private redis-server did not start")
        store.append_event(Event("u", "i"))
        assert len(store.get_one("u").session) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{free_port}"):
        store.get_one("u")
    with pytest.raises(BackendUnavailable, match="redis-server running"):
        store.append_event(Event("u", "j"))
    store.close()


def test_a_hung_redis_answers_within_the_deadline_and_recovers(free_port: int, spawn_redis) -> None:
    """SIGSTOP: reads fail after timeout_s (not redis-py's 5 s x retries), then fail fast while marked
    down, and work again by themselves once the server runs again."""
    import os
    import signal

    proc = spawn_redis(free_port, "--appendonly", "no")
    url = f"redis://127.0.0.1:{free_port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                # retry_s 2: the fail-fast window outlasts any scheduling pause between the calls below
                store = RedisFeatureStore(url, prefix="hung:", timeout_s=0.1, write_timeout_s=0.3, retry_s=2.0)
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)
        assert store.does_io and store.available()
        store.append_event(Event("u", "i"))
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable, match="Timeout"):
            store.get_one("u")
        assert time.perf_counter() - t0 < 5.0  # the 0.1 s deadline; without one the call waits for ever
        assert not store.available()
        # Marked down: refused without a call to Redis (the message says so, and the click never lands).
        with pytest.raises(BackendUnavailable, match="not retried"):
            store.append_event(Event("u", "j"))
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(2.1)
        assert [e.item_id for e in store.get_one("u").session][-1] == "i" and store.available()
        store.ping()
        store.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)


def test_redis_errors_never_carry_the_password(free_port: int) -> None:
    url = f"redis://:Secret-Pw-4417@127.0.0.1:{free_port}/0"
    with pytest.raises(BackendUnavailable) as e:
        open_store(url)
    assert "Secret-Pw-4417" not in str(e.value) and "redis://***@127.0.0.1" in str(e.value)

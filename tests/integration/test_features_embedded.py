"""Embedded store specifics: persistence across restarts and across a killed process."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from towerann.errors import ArtifactError, BackendUnavailable, ConfigError
from towerann.features import Event, open_store
from towerann.features.embedded import EmbeddedFeatureStore


def test_restart_keeps_session_and_static_features(tmp_path) -> None:
    path = tmp_path / "f.sqlite"
    store = open_store("embedded", path=path)
    store.put_users([{"user_id": "u1", "age": 30, "city": "Lyon", "recent_items": ["i2", "i1"]}])
    first = store.append_event(Event("u1", "a"))
    second = store.append_event(Event("u1", "b", type="buy"))
    store.append_events([Event("u2", "c")])
    store.close()

    again = open_store(f"embedded://{path}")
    f = again.get_one("u1")
    assert f.known and f.static == {"age": 30.0, "city": "Lyon"} and f.recent_items == ("i2", "i1")
    assert f.session == (second, first)
    assert [e.item_id for e in again.get_one("u2").session] == ["c"]
    assert again.stats()["users"] == 1 and again.stats()["events"] == 3
    again.close()


def test_event_survives_sigkill_right_after_append(tmp_path) -> None:
    path = tmp_path / "f.sqlite"
    child = textwrap.dedent(f"""
        import os, signal, sys
        from towerann.features import Event, open_store
        store = open_store("embedded", path={str(path)!r})
        store.put_users([{{"user_id": "u1", "age": 5}}])
        for i in range(20):
            store.append_event(Event("u1", f"i{{i}}"))
        stored = store.append_event(Event("u1", "last", type="buy"))
        print(repr(stored.ts), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no flush of anything
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ts = float(proc.stdout.strip())

    store = open_store("embedded", path=path)
    f = store.get_one("u1")
    assert f.static == {"age": 5.0}
    assert f.session[0] == Event("u1", "last", "buy", ts)
    assert [e.item_id for e in f.session] == ["last"] + [f"i{i}" for i in reversed(range(20))]
    store.close()


def test_file_is_capped_and_expired_events_dropped_on_open(tmp_path) -> None:
    path = tmp_path / "f.sqlite"
    store = EmbeddedFeatureStore(path, max_events=3, ttl_s=100)
    now = time.time()
    store.append_event(Event("old", "x", ts=now - 500))  # already expired
    for i in range(10):
        store.append_event(Event("u1", f"i{i}", ts=now - 10 + i))
    store.close()
    with sqlite3.connect(path) as db:  # the file holds no more than the store can return
        assert db.execute("SELECT COUNT(*) FROM events WHERE user_id='u1'").fetchone()[0] == 3
    reopened = EmbeddedFeatureStore(path, max_events=3, ttl_s=100)
    assert [e.item_id for e in reopened.get_one("u1").session] == ["i9", "i8", "i7"]
    assert reopened.get_one("old").session == ()
    assert reopened.stats()["session_users"] == 1  # the expired user was not even loaded
    reopened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM events WHERE user_id='old'").fetchone()[0] == 0


def test_memory_store_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for store in (open_store("memory"), open_store("embedded")):
        store.put_users([{"user_id": "u", "x": 1}])
        store.append_event(Event("u", "i"))
        assert store.get_one("u").known and len(store.get_one("u").session) == 1
        assert store.stats()["path"] is None
        store.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_files_and_closed_store(tmp_path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ArtifactError, match="junk.sqlite"):
        open_store("embedded", path=junk)
    with pytest.raises(ArtifactError, match="directory"):
        open_store("embedded", path=tmp_path)
    store = open_store("embedded", path=tmp_path / "ok.sqlite")
    store.close()
    store.close()  # idempotent
    with pytest.raises(BackendUnavailable, match="closed"):
        store.get_one("u")
    with pytest.raises(BackendUnavailable, match="closed"):
        store.append_event(Event("u", "i"))


def test_open_store_urls(tmp_path) -> None:
    for bad in ("sqlite:///x", "embedded://relative.sqlite", "", "redis"):
        with pytest.raises(ConfigError, match="embedded"):
            open_store(bad)
    with pytest.raises(ConfigError, match="disagree"):
        open_store(f"embedded://{tmp_path}/a.sqlite", path=tmp_path / "b.sqlite")
    with pytest.raises(ConfigError, match="memory"):
        open_store("memory", path=tmp_path / "a.sqlite")
    with pytest.raises(ConfigError, match="max_events"):
        open_store("memory", max_events=0)
    with pytest.raises(ConfigError, match="ttl_s"):
        open_store("memory", ttl_s=-1)
    store = open_store(f"embedded://{tmp_path}/sub/a.sqlite")
    store.append_event(Event("u", "i"))
    store.close()
    assert (tmp_path / "sub" / "a.sqlite").exists()


def test_purge_expired_frees_memory_and_file(tmp_path) -> None:
    path = tmp_path / "f.sqlite"
    store = EmbeddedFeatureStore(path, ttl_s=100)
    store.append_events(
        [
            Event("old", "a", ts=1000.0),
            Event("mixed", "b", ts=1000.0),
            Event("mixed", "c", ts=1150.0),
            Event("new", "d", ts=1190.0),
        ]
    )
    assert store.purge_expired(now=1200.0) == 1  # only "old" has nothing left
    assert store.stats()["session_users"] == 2
    assert [e.item_id for e in store.get_one("mixed", now=1200.0).session] == ["c"]
    with sqlite3.connect(path) as db:
        assert sorted(r[0] for r in db.execute("SELECT item_id FROM events")) == ["c", "d"]
    store.close()

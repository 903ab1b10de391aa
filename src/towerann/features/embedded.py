"""The default feature store: in-process dicts, persisted to SQLite.

Reads are served from memory (microseconds, no IO on the request path). Writes go to SQLite in
WAL mode with synchronous=NORMAL before they are acknowledged: a committed transaction then
survives a killed process (SIGKILL), though not a power cut, which is the trade-off a session
store wants. A new store object on the same file rebuilds its memory from SQLite on open.

Bounded: at most `max_events` events per user, the sessions of at most `max_session_users` users,
and sessions of at most `session_memory_mb` of memory all told (an estimate kept per event, from
SESSION_BYTES and EVENT_BYTES); a click beyond either cap drops the session of the least recently
active user (memory and file alike), so clicks from ever new user ids cannot grow the process or
the file without end. The memory cap is the one that binds: 1 GiB holds ~1M one-click sessions,
or ~80k sessions of 50 events.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from towerann.errors import ArtifactError, BackendUnavailable, ConfigError
from towerann.features.store import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    Event,
    FeatureStore,
    UserFeatures,
    check_id,
    check_user_ids,
    live_session,
    normalize_row,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSION_USERS = 1_000_000
DEFAULT_SESSION_MEMORY_MB = 1024.0
# Python's bytes for a session (its deque and dict entry) and for one event in it, plus the lengths of
# the ids they hold; measured with tracemalloc (tests/unit/test_session_memory.py checks the estimate
# stays above the measurement): ~830 and ~240 bytes with 12-character ids.
SESSION_BYTES, EVENT_BYTES = 850, 225
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, static TEXT NOT NULL, recent TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL, item_id TEXT NOT NULL, type TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_user_seq ON events (user_id, seq);
"""

_Record = tuple[dict[str, float | str], tuple[str, ...]]


class EmbeddedFeatureStore(FeatureStore):
    """In-memory feature store with optional SQLite persistence (`path=None`: memory only)."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        ttl_s: float = DEFAULT_TTL_S,
        max_session_users: int = DEFAULT_MAX_SESSION_USERS,
        session_memory_mb: float = DEFAULT_SESSION_MEMORY_MB,
    ) -> None:
        super().__init__(max_events, ttl_s)
        if isinstance(max_session_users, bool) or not isinstance(max_session_users, int) or max_session_users < 1:
            raise ConfigError(f"max_session_users must be an integer >= 1, got {max_session_users!r}")
        if (
            isinstance(session_memory_mb, bool)
            or not isinstance(session_memory_mb, (int, float))
            or not session_memory_mb > 0
        ):
            raise ConfigError(f"session_memory_mb must be a positive number, got {session_memory_mb!r}")
        self.max_session_users = max_session_users
        self.max_session_bytes = int(session_memory_mb * (1 << 20))
        self.session_bytes = 0  # the estimate of what the sessions hold now
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._users: dict[str, _Record] = {}
        # user -> events (newest at the left); the least recently active user first
        self._sessions: OrderedDict[str, deque[Event]] = OrderedDict()
        self.evicted_sessions = 0
        self._closed = False
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self._db = self._open_db(self.path)
            self._load(self._db)

    # ---- persistence ---------------------------------------------------------------------------

    def _open_db(self, path: Path) -> sqlite3.Connection:
        if path.is_dir():
            raise ArtifactError(f"{path}: is a directory; give the feature store a .sqlite file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # check_same_thread=False: the HTTP server calls us from many threads; self._lock
            # serialises every use of the connection.
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise ArtifactError(
                    f"{path}: feature store schema_version {row[0]} is not supported (expected "
                    f"{SCHEMA_VERSION}); reload the features into a new file with `towerann features load`"
                )
        except sqlite3.DatabaseError as e:
            raise ArtifactError(f"{path}: not a usable towerann feature store SQLite file ({e})") from e
        return db

    def _load(self, db: sqlite3.Connection) -> None:
        """Rebuild memory from SQLite, dropping session events that are already expired."""
        t0 = time.perf_counter()
        for user_id, static, recent in db.execute("SELECT user_id, static, recent FROM users"):
            self._users[user_id] = (json.loads(static), tuple(json.loads(recent)))
        cutoff = time.time() - self.ttl_s
        db.execute("DELETE FROM events WHERE ts < ?", (cutoff,))
        for user_id, item_id, type_, ts in db.execute("SELECT user_id, item_id, type, ts FROM events ORDER BY seq"):
            self._add_event(Event(user_id, item_id, type_, ts))
        evicted = self._evict_overflow()  # a file written with a larger cap
        if evicted:
            with db:
                db.execute("BEGIN")
                self._delete_sessions(db, evicted)
        log.info(
            "feature store %s: %d users, %d session users loaded in %.2fs",
            self.path,
            len(self._users),
            len(self._sessions),
            time.perf_counter() - t0,
        )

    def _add_event(self, e: Event) -> None:
        """Add an event to its user's session, now the most recently active one."""
        session = self._sessions.get(e.user_id)
        if session is None:
            session = self._sessions[e.user_id] = deque(maxlen=self.max_events)
            self.session_bytes += SESSION_BYTES + len(e.user_id)
        else:
            self._sessions.move_to_end(e.user_id)
            if len(session) == session.maxlen:  # the oldest event makes room
                self.session_bytes -= _event_bytes(session[-1])
        session.appendleft(e)
        self.session_bytes += _event_bytes(e)

    @staticmethod
    def _session_cost(user_id: str, session: deque[Event]) -> int:
        return SESSION_BYTES + len(user_id) + sum(_event_bytes(e) for e in session)

    def _drop_session(self, user_id: str) -> None:
        self.session_bytes -= self._session_cost(user_id, self._sessions.pop(user_id))

    def _evict_overflow(self, keep: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Drop the least recently active sessions beyond max_session_users or the memory cap (users
        in `keep`, those of the write being made, last)."""
        excess_users = len(self._sessions) - self.max_session_users
        excess_bytes = self.session_bytes - self.max_session_bytes
        evicted: list[str] = []
        for user_id, session in self._sessions.items():  # oldest first; stops once enough is freed
            if excess_users <= 0 and excess_bytes <= 0:
                break
            if user_id not in keep:
                evicted.append(user_id)
                excess_users -= 1
                excess_bytes -= self._session_cost(user_id, session)
        for user_id in evicted:
            self._drop_session(user_id)
        while self._sessions and (
            len(self._sessions) > self.max_session_users or self.session_bytes > self.max_session_bytes
        ):  # one batch alone went past
            user_id = next(iter(self._sessions))
            self._drop_session(user_id)
            evicted.append(user_id)
        self.evicted_sessions += len(evicted)
        return evicted

    @staticmethod
    def _delete_sessions(db: sqlite3.Connection, user_ids: list[str]) -> None:
        for start in range(0, len(user_ids), 500):  # SQLite caps the number of bound parameters
            chunk = user_ids[start : start + 500]
            db.execute(f"DELETE FROM events WHERE user_id IN ({','.join('?' * len(chunk))})", chunk)

    def _check_open(self) -> None:
        if self._closed:
            # no path: this message is an HTTP answer too (503), and callers need not learn the server's disk
            raise BackendUnavailable("the feature store is closed; open a new one")

    # ---- writes --------------------------------------------------------------------------------

    def put_users(self, rows: Iterable[Mapping[str, Any]]) -> int:
        records = [normalize_row(r) for r in rows]  # validate all before writing any
        with self._lock:
            self._check_open()
            if self._db is not None:
                with self._db:  # one transaction
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO users VALUES (?, ?, ?)",
                        [(u, json.dumps(s), json.dumps(list(r))) for u, s, r in records],
                    )
            for user_id, static, recent in records:
                self._users[user_id] = (static, recent)
        return len(records)

    def _append(self, events: list[Event]) -> None:
        if not events:
            return
        users = {e.user_id for e in events}
        with self._lock:
            self._check_open()
            if self._db is not None:
                with self._db:  # committed (WAL, synchronous=NORMAL) before we acknowledge
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT INTO events (user_id, item_id, type, ts) VALUES (?, ?, ?, ?)",
                        [(e.user_id, e.item_id, e.type, e.ts) for e in events],
                    )
                    for user_id in users:
                        self._trim(self._db, user_id)
            for e in events:
                self._add_event(e)
            evicted = self._evict_overflow(keep=users)
            if evicted and self._db is not None:
                with self._db:
                    self._db.execute("BEGIN")
                    self._delete_sessions(self._db, evicted)

    def _trim(self, db: sqlite3.Connection, user_id: str) -> None:
        # Keep the file bounded like the memory: only the last max_events rows per user survive.
        db.execute(
            "DELETE FROM events WHERE user_id = ? AND seq <= (SELECT seq FROM events WHERE user_id = ? "
            "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (user_id, user_id, self.max_events),
        )

    def purge_expired(self, now: float | None = None) -> int:
        """Forget sessions whose every event is older than ttl_s; return how many users were dropped.

        Reads already hide expired events; this reclaims their memory and file space. It walks
        every session under the lock, so call it from a timer, not per request (a restart does
        the same on open).
        """
        cutoff = (time.time() if now is None else now) - self.ttl_s
        with self._lock:
            self._check_open()
            stale = [u for u, events in self._sessions.items() if all(e.ts < cutoff for e in events)]
            if self._db is not None:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.execute("DELETE FROM events WHERE ts < ?", (cutoff,))
            for u in stale:
                self._drop_session(u)
        return len(stale)

    def clear(self) -> int:
        with self._lock:
            self._check_open()
            n = len(self._users) + len(self._sessions)
            if self._db is not None:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.execute("DELETE FROM users")
                    self._db.execute("DELETE FROM events")
            self._users.clear()
            self._sessions.clear()
            self.session_bytes = 0
        return n

    # ---- reads ---------------------------------------------------------------------------------

    def get(self, user_ids: Sequence[str], now: float | None = None) -> list[UserFeatures]:
        ids = check_user_ids(user_ids)
        now = time.time() if now is None else now
        with self._lock:
            self._check_open()
            found = [(u, self._users.get(u), tuple(self._sessions.get(u, ()))) for u in ids]
        return [self._features(u, rec, events, now) for u, rec, events in found]

    def get_one(self, user_id: str, now: float | None = None) -> UserFeatures:  # the request path: no list
        check_id(user_id, "user_id")
        now = time.time() if now is None else now
        with self._lock:
            self._check_open()
            rec, events = self._users.get(user_id), tuple(self._sessions.get(user_id, ()))
        return self._features(user_id, rec, events, now)

    def _features(self, user_id: str, rec: _Record | None, events: tuple[Event, ...], now: float) -> UserFeatures:
        session = live_session(events, now, self.ttl_s, self.max_events)
        if rec is None:
            return UserFeatures(user_id, False, {}, (), session)
        return UserFeatures(user_id, True, dict(rec[0]), rec[1], session)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": "embedded",
                "path": str(self.path) if self.path else None,
                "users": len(self._users),
                "session_users": len(self._sessions),
                "events": sum(len(s) for s in self._sessions.values()),
                "max_events": self.max_events,
                "ttl_s": self.ttl_s,
                "max_session_users": self.max_session_users,
                "evicted_sessions": self.evicted_sessions,
                "session_bytes": self.session_bytes,
                "max_session_bytes": self.max_session_bytes,
            }

    def ping(self) -> None:
        with self._lock:
            self._check_open()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None


def _event_bytes(e: Event) -> int:
    return EVENT_BYTES + len(e.item_id) + len(e.user_id)

"""The delta log: every item write (upsert, availability, delete), durable before it is acknowledged.

A swap to a rebuilt bundle, or a restart, replays the entries newer than the bundle's cut-off,
so nothing acknowledged is lost. Upserts log the item's *features*, not its vector: a bundle
built by a new item tower re-embeds them with that tower on replay. On a vectors-only bundle (no
towers) the vector is the item: its upserts log the vector as written.

Two backends: SQLite (WAL; the embedded default) and a Redis stream. A Redis that is down, hung or
refusing turns every call into BackendUnavailable (HTTP 503) within `timeout_s`, and for `retry_s`
after a failure calls fail at once (`available()` is False meanwhile).

Durable means durable: a stream entry survives a crash of Redis only if Redis logs its writes
(appendonly yes). `check_durable` reads the server's settings; the service refuses to start on a
Redis that does not (unless [freshness] allow_volatile = true, which only warns).
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from towerann.config import Config
from towerann.errors import ArtifactError, BackendUnavailable, BadRequest, ConfigError
from towerann.storeurl import parse_store_url

if TYPE_CHECKING:
    from towerann.features.redis_store import RedisLink

log = logging.getLogger(__name__)

OPS = ("upsert", "available", "delete")


@dataclass(frozen=True)
class DeltaEntry:
    seq: int  # strictly increasing within one log
    op: str  # "upsert" | "available" | "delete"
    item_id: str
    payload: dict[str, Any] = field(
        default_factory=dict
    )  # upsert: the item's catalog row (+ "vector" on a vectors-only bundle); available: {"available": bool}
    ts: float = 0.0


class DeltaLog(Protocol):
    does_io: bool  # calls may wait on the network (the HTTP app then checks available() before a write)
    where: str  # what and where it is, for messages (no credentials)

    def identity(self) -> tuple[str, str | None]: ...  # (this log's id, the id of the index root it belongs to)
    def claim(self, root_id: str) -> str: ...  # make it the root's unless it is another's; returns the owner
    def available(self) -> bool: ...
    def ping(self) -> None: ...
    def append(self, op: str, item_id: str, payload: dict[str, Any] | None = None) -> DeltaEntry: ...
    def append_many(self, entries: list[tuple[str, str, dict[str, Any]]]) -> list[DeltaEntry]: ...
    def since(self, seq: int) -> Iterator[DeltaEntry]: ...
    def last_seq(self) -> int: ...
    def close(self) -> None: ...


def _encode(entries: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """Check every entry, then encode the payloads: (op, item_id, payload JSON), all or none."""
    for op, item_id, _ in entries:
        if op not in OPS:
            raise BadRequest(f"unknown delta-log op {op!r}; expected one of {', '.join(OPS)}")
        if not isinstance(item_id, str) or not item_id:
            raise BadRequest("item_id must be a non-empty string")
    return [(op, item_id, json.dumps(payload or {}, default=_json_default)) for op, item_id, payload in entries]


class SQLiteDeltaLog:
    """Append-only table in a SQLite file (WAL, synchronous=NORMAL: survives a killed process)."""

    does_io = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = f"the SQLite delta log {self.path}"
        if self.path.is_dir():
            raise ArtifactError(f"{self.path}: is a directory; [freshness] delta_path names the delta log's file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS delta (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
                "op TEXT NOT NULL, item_id TEXT NOT NULL, payload TEXT NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('log_id', ?)", (uuid.uuid4().hex,))
        except sqlite3.DatabaseError as e:
            raise ArtifactError(
                f"{self.path}: not a usable delta log ({e}); restore it from a backup, or move it "
                "aside to start an empty one (writes in it not yet in a bundle are then lost)"
            ) from e

    def durability(self) -> dict[str, str]:
        """The connection's journal mode and synchronous setting (what a write survives before its ack)."""
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
            sync = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return {"journal_mode": str(mode), "synchronous": {0: "off", 1: "normal", 2: "full", 3: "extra"}.get(sync, "?")}

    def identity(self) -> tuple[str, str | None]:
        with self._lock:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        return meta["log_id"], meta.get("root_id")

    def claim(self, root_id: str) -> str:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('root_id', ?)", (root_id,))
            return str(self._db.execute("SELECT value FROM meta WHERE key = 'root_id'").fetchone()[0])

    def append(self, op: str, item_id: str, payload: dict[str, Any] | None = None) -> DeltaEntry:
        return self.append_many([(op, item_id, payload or {})])[0]

    def append_many(self, entries: list[tuple[str, str, dict[str, Any]]]) -> list[DeltaEntry]:
        now = time.time()
        rows = [(now, op, item_id, payload) for op, item_id, payload in _encode(entries)]
        out = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    seq = self._db.execute(
                        "INSERT INTO delta (ts, op, item_id, payload) VALUES (?, ?, ?, ?)", row
                    ).lastrowid
                    assert seq is not None  # an INSERT into a rowid table sets it
                    out.append(DeltaEntry(seq, row[1], row[2], json.loads(row[3]), now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def since(self, seq: int) -> Iterator[DeltaEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, op, item_id, payload, ts FROM delta WHERE seq > ? ORDER BY seq", (int(seq),)
            ).fetchall()
        for s, op, item_id, payload, ts in rows:
            yield DeltaEntry(int(s), op, item_id, _payload(payload, s, self.where), float(ts))

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM delta").fetchone()
        return int(row[0] or 0)

    def available(self) -> bool:
        return True

    def ping(self) -> None:
        self.last_seq()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisDeltaLog:
    """A Redis stream; entry ids are mapped to increasing integers (ms * 2^20 + sequence)."""

    does_io = True

    def __init__(
        self,
        url: str,
        key: str = "towerann:delta",
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        connect_timeout_s: float = 2.0,
    ):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from towerann.features.redis_store import RedisLink

        self.key, self.meta_key = key, f"{key}:meta"
        self._link = RedisLink(
            url,
            what="delta log",
            timeout_s=timeout_s,
            write_timeout_s=timeout_s,
            retry_s=retry_s,
            decode_responses=False,
        )
        self.url = self._link.safe_url
        self.where = f"the delta log stream {key!r} in Redis at {self.url}"
        self._r = self._link.write
        # At startup a slow first connection is no outage: one ping with a longer deadline.
        probe = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=max(connect_timeout_s, timeout_s),
            retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
        )
        try:
            self._link.call(probe.ping, track=False)
        finally:
            probe.close()

    @property
    def link(self) -> RedisLink:
        return self._link

    def available(self) -> bool:
        return self._link.available()

    def identity(self) -> tuple[str, str | None]:
        self._link.call(lambda: self._r.hsetnx(self.meta_key, "log_id", uuid.uuid4().hex))
        meta = self._link.call(lambda: self._r.hgetall(self.meta_key))
        owner = meta.get(b"root_id")
        return meta[b"log_id"].decode(), owner.decode() if owner else None

    def claim(self, root_id: str) -> str:
        self._link.call(lambda: self._r.hsetnx(self.meta_key, "root_id", root_id))
        return bytes(self._link.call(lambda: self._r.hget(self.meta_key, "root_id"))).decode()

    def ping(self) -> None:
        self._link.ping()

    def persistence(self) -> dict[str, str]:
        return self._link.persistence()

    @staticmethod
    def _seq(stream_id: bytes | str) -> int:
        ms, n = (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).split("-")
        return (int(ms) << 20) + int(n)

    @staticmethod
    def _stream_id(seq: int) -> str:
        return f"{seq >> 20}-{seq & ((1 << 20) - 1)}"

    def append(self, op: str, item_id: str, payload: dict[str, Any] | None = None) -> DeltaEntry:
        return self.append_many([(op, item_id, payload or {})])[0]

    def append_many(self, entries: list[tuple[str, str, dict[str, Any]]]) -> list[DeltaEntry]:
        encoded = _encode(entries)
        self._link.check_durable()
        now = time.time()
        pipe = self._r.pipeline(transaction=True)
        for op, item_id, payload in encoded:
            pipe.xadd(self.key, {"op": op, "item_id": item_id, "payload": payload, "ts": repr(now)})
        ids = self._link.call(pipe.execute)
        return [
            DeltaEntry(self._seq(i), op, item_id, payload or {}, now) for i, (op, item_id, payload) in zip(ids, entries)
        ]

    def since(self, seq: int) -> Iterator[DeltaEntry]:
        start = "(" + self._stream_id(seq) if seq > 0 else "-"
        while True:
            batch = self._link.call(functools.partial(self._r.xrange, self.key, min=start, max="+", count=10_000))
            if not batch:
                return
            for sid, f in batch:
                seq = self._seq(sid)
                yield DeltaEntry(
                    seq,
                    f[b"op"].decode(),
                    f[b"item_id"].decode(),
                    _payload(f[b"payload"], seq, self.where),
                    float(f[b"ts"]),
                )
            start = "(" + (batch[-1][0].decode() if isinstance(batch[-1][0], bytes) else batch[-1][0])

    def last_seq(self) -> int:
        last = self._link.call(lambda: self._r.xrevrange(self.key, count=1))
        return self._seq(last[0][0]) if last else 0

    def close(self) -> None:
        self._link.close()


def _payload(raw: str | bytes, seq: int, where: str) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{where}: entry {seq} is not JSON ({e}); the log is corrupt - restore it from a backup"
        ) from e
    if not isinstance(payload, dict):
        raise ArtifactError(f"{where}: entry {seq} is not a JSON object; the log is corrupt - restore it from a backup")
    return payload


def open_delta_log(
    url: str, path: str | Path | None = None, key: str = "towerann:delta", timeout_s: float = 1.0, retry_s: float = 1.0
) -> DeltaLog:
    """ "embedded" (SQLite at `path`) or "redis://host:port/db" (a stream at `key`)."""
    u = parse_store_url(url)
    if u.is_redis:
        return RedisDeltaLog(u.url, key, timeout_s=timeout_s, retry_s=retry_s)
    if u.scheme == "feast":
        raise ConfigError("the delta log cannot live in Feast; use 'embedded' (SQLite) or a Redis URL")
    path = path or u.path
    if path is None:
        raise ConfigError("the embedded delta log needs a file path")
    return SQLiteDeltaLog(path)


def open_configured_delta_log(cfg: Config) -> DeltaLog:
    """A deployment's delta log: a stream in the feature store's Redis, else SQLite at
    [freshness] delta_path (default: delta.sqlite inside the [paths] index root, so that each root has
    its own; freshness.log_binding checks that a log is served with the root it belongs to)."""
    if parse_store_url(cfg.features.store).is_redis:
        return open_delta_log(
            cfg.features.store, timeout_s=cfg.freshness.timeout_ms / 1e3, retry_s=cfg.features.retry_s
        )
    return open_delta_log("embedded", cfg.freshness.delta_path or default_delta_path(cfg.paths.index))


def default_delta_path(index: str | Path) -> Path:
    """delta.sqlite inside an index root (a directory with CURRENT); beside a single snapshot served as is."""
    index = Path(index)
    return (
        index / "delta.sqlite" if (index / "CURRENT").exists() or not index.exists() else index.parent / "delta.sqlite"
    )


class DurabilityWatch:
    """Re-reads the persistence settings of the delta log's Redis while serving (check_durable reads
    them once, at startup): while Redis does not log writes (CONFIG SET appendonly no on a running
    server), the delta log and the feature store's Redis links refuse acknowledged writes - item
    writes and clicks get 503 - and `problem` says why (/readyz shows it), until it logs again."""

    def __init__(self, delta: RedisDeltaLog, links: list[RedisLink]):
        self.delta, self.links = delta, links
        self.problem: str | None = None

    def check(self) -> str | None:
        try:
            found = self.delta.persistence()
        except BackendUnavailable:
            return self.problem  # unreachable: the links fail fast on their own; the verdict stands
        problem = None if found.get("appendonly") == "yes" else f"appendonly {found.get('appendonly') or '?'}"
        if problem != self.problem:
            if problem:
                log.error(
                    "%s stopped logging writes (%s): item writes and clicks are refused until it logs again",
                    self.delta.where,
                    problem,
                    extra={"event": "durability_lost"},
                )
            else:
                log.warning(
                    "%s logs writes again (appendonly yes): item writes and clicks are taken",
                    self.delta.where,
                    extra={"event": "durability_back"},
                )
            self.problem = problem
            for link in self.links:
                link.not_durable = problem
        return problem


def check_durable(delta: DeltaLog, allow_volatile: bool = False) -> str:
    """Refuse (ConfigError) a delta log in a Redis that would lose acknowledged writes in a crash of
    Redis itself; with `allow_volatile`, only warn. Return what was found, for the log.

    appendonly yes + appendfsync always: nothing acknowledged is lost, even in a power cut.
    appendonly yes + everysec (or no): a crash of Redis loses nothing (each write reaches the file
    before the reply); a crash of the machine can lose the last second (or the OS's flush interval).
    appendonly no: RDB snapshots at best, so everything since the last snapshot can go: refused."""
    persistence = getattr(delta, "persistence", None)
    if persistence is None:
        return "sqlite"
    where = getattr(delta, "url", "Redis")
    fix = (
        "start Redis with --appendonly yes --appendfsync always (or set them in redis.conf; see SECURITY.md), "
        "or set [freshness] allow_volatile = true to serve anyway"
    )
    try:
        found = persistence()
    except BackendUnavailable as e:
        problem = f"cannot read the persistence settings of {where} ({e})"
    else:
        if found.get("appendonly") == "yes":
            if found.get("appendfsync") != "always":
                log.warning(
                    "delta log in %s: appendonly yes, appendfsync %s: a crash of Redis loses no acknowledged "
                    "write, a crash of the machine can lose the last second of them (appendfsync always "
                    "closes that gap)",
                    where,
                    found.get("appendfsync"),
                )
            return f"appendonly yes, appendfsync {found.get('appendfsync')}"
        problem = (
            f"{where} runs with appendonly {found.get('appendonly') or '?'}: a crash of Redis would lose "
            "acknowledged item writes and clicks"
        )
    if not allow_volatile:
        raise ConfigError(f"refusing to keep the delta log in Redis: {problem}; {fix}")
    log.warning("[freshness] allow_volatile = true: serving although %s", problem)
    return "volatile (allowed)"


def _json_default(value: Any) -> Any:
    # numpy scalars in item rows
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

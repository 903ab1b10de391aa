"""Feature store on a Redis server, for deployments where several serving processes share state.

Layout under a key prefix (a namespace, so tenants and tests don't collide):
  {prefix}u:{user_id}  hash: one field per static feature (JSON-encoded so floats and strings
                       keep their type) + field "recent_items" (JSON list). The field is always
                       written, so "the hash exists" means "the user is known".
  {prefix}s:{user_id}  list: session events as JSON [item_id, type, ts], newest at the head,
                       capped by LTRIM and expired by PEXPIRE in the same MULTI/EXEC as the LPUSH.
A get() of many users is one pipelined round trip. Durability of events is the server's
(its appendonly/appendfsync settings, which `RedisLink.persistence` reads): append_event returns
once the server has applied the write.

A Redis that is down or hung never holds a caller for long: every call has a socket deadline
(reads `timeout_s`, writes `write_timeout_s`), redis-py's own retries are off (one immediate retry
on a dropped connection, which is what a restarted Redis leaves in the pool), and after a failure
the link fails fast for `retry_s` instead of waiting on the server again (`available()` is False
meanwhile; the next call after it tries again, so the store recovers by itself).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from towerann.errors import BackendUnavailable, DataError
from towerann.features.store import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    RECENT_ITEMS,
    Event,
    FeatureStore,
    UserFeatures,
    check_user_ids,
    live_session,
    normalize_row,
)
from towerann.storeurl import redact

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisLink:
    """Clients for one Redis URL with deadlines, fail-fast after a failure, and redacted errors.

    Shared by the feature store and the delta log (freshness.deltalog). `read` has the short
    request-path deadline, `write` the longer one for acknowledged writes and maintenance."""

    def __init__(
        self,
        url: str,
        *,
        what: str,
        timeout_s: float = 0.1,
        write_timeout_s: float = 1.0,
        retry_s: float = 1.0,
        decode_responses: bool = True,
    ) -> None:
        self.safe_url = redact(url)  # for messages: the password never leaves
        self.what, self.retry_s = what, float(retry_s)
        # Set while serving when this Redis stopped logging its writes (freshness.deltalog.DurabilityWatch):
        # acknowledged writes would not survive a restart of Redis, so none is taken.
        self.not_durable: str | None = None
        self._down_until = 0.0
        self._last_error = ""
        self._lock = threading.Lock()

        def client(deadline_s: float) -> redis.Redis:
            return redis.Redis.from_url(
                url,
                decode_responses=decode_responses,
                socket_connect_timeout=deadline_s,
                socket_timeout=deadline_s,
                retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
            )

        try:
            self.read, self.write = client(timeout_s), client(write_timeout_s)
        except ValueError as e:  # malformed URL
            raise BackendUnavailable(
                f"bad redis URL {self.safe_url!r} ({redact(str(e))}); expected redis://HOST:PORT/DB"
            ) from e

    def check_durable(self) -> None:
        """Before an acknowledged write: refuse it (503) while this Redis does not log writes."""
        if self.not_durable:
            raise BackendUnavailable(
                f"Redis at {self.safe_url} no longer logs writes ({self.not_durable}), so the "
                f"{self.what} takes none; nothing was written: retry once it does"
            )

    def available(self) -> bool:
        """False while a recent failure makes calls fail fast (for `retry_s` after it)."""
        return time.monotonic() >= self._down_until

    def call(self, fn: Callable[..., Any], *args: Any, track: bool = True) -> Any:
        """Run one Redis call; a dead, hung or refusing server becomes a BackendUnavailable.

        track=False (the startup probe): a failure is raised but not remembered nor logged."""
        if track and time.monotonic() < self._down_until:
            raise BackendUnavailable(
                f"cannot reach Redis at {self.safe_url} for the {self.what} ({self._last_error}; "
                f"not retried for {self.retry_s:g}s after a failure); is redis-server running "
                "and listening there?"
            )
        try:
            out = fn(*args)
        except REDIS_DOWN as e:
            if track:
                self._failed(e)
            raise BackendUnavailable(
                f"cannot reach Redis at {self.safe_url} for the {self.what} ({redact(str(e))}); is redis-server "
                "running and listening there?"
            ) from e
        except redis.exceptions.ResponseError as e:
            raise BackendUnavailable(
                f"Redis at {self.safe_url} refused a command of the {self.what} ({redact(str(e))})"
            ) from e
        if self._down_until:
            with self._lock:
                if self._down_until:
                    self._down_until = 0.0
                    log.info("Redis at %s (%s) answers again", self.safe_url, self.what, extra={"event": "redis_back"})
        return out

    def _failed(self, e: Exception) -> None:
        with self._lock:
            first = self._down_until == 0.0
            self._last_error = redact(f"{type(e).__name__}: {e}")
            self._down_until = time.monotonic() + self.retry_s
        if first:  # once per outage, not once per request
            log.warning(
                "Redis at %s (%s) is unavailable: %s",
                self.safe_url,
                self.what,
                self._last_error,
                extra={"event": "redis_down"},
            )

    def ping(self) -> None:
        self.call(self.read.ping)

    def persistence(self) -> dict[str, str]:
        """The server's appendonly and appendfsync settings (CONFIG GET); raises BackendUnavailable
        when the server refuses CONFIG (e.g. a managed Redis that renamed it)."""
        out: dict[str, str] = {}
        for key in ("appendonly", "appendfsync"):
            got = self.call(self.write.config_get, key)
            value = got.get(key, got.get(key.encode(), "")) if isinstance(got, dict) else ""
            out[key] = value.decode() if isinstance(value, bytes) else str(value)
        return out

    def close(self) -> None:
        self.read.close()
        self.write.close()


class RedisFeatureStore(FeatureStore):
    """FeatureStore on a real Redis server at `url` (redis://host:port/db)."""

    does_io = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        ttl_s: float = DEFAULT_TTL_S,
        prefix: str = "towerann:",
        connect_timeout_s: float = 2.0,
        timeout_s: float = 0.1,
        write_timeout_s: float = 1.0,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__(max_events, ttl_s)
        self._link = RedisLink(
            url, what="feature store", timeout_s=timeout_s, write_timeout_s=write_timeout_s, retry_s=retry_s
        )
        self.url = self._link.safe_url  # for messages: the password never leaves
        self.prefix = prefix
        self._r, self._w = self._link.read, self._link.write
        # At startup a slow first connection is no outage: one ping with a longer deadline.
        probe = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=max(connect_timeout_s, write_timeout_s),
            retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
        )
        try:
            self._link.call(probe.ping, track=False)
        except BackendUnavailable as e:
            raise BackendUnavailable(f"{e} Or use the embedded store (--store embedded)") from e
        finally:
            probe.close()
        log.info("feature store on %s (prefix %r)", self.url, prefix)

    @property
    def link(self) -> RedisLink:
        return self._link

    def _call(self, fn: Any, *args: Any) -> Any:
        return self._link.call(fn, *args)

    def available(self) -> bool:
        return self._link.available()

    def ping(self) -> None:
        self._link.ping()

    def _ukey(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}"

    def _skey(self, user_id: str) -> str:
        return f"{self.prefix}s:{user_id}"

    # ---- writes --------------------------------------------------------------------------------

    def put_users(self, rows: Iterable[Mapping[str, Any]]) -> int:
        records = [normalize_row(r) for r in rows]  # validate all before writing any
        if not records:
            return 0
        pipe = self._w.pipeline(transaction=True)
        for user_id, static, recent in records:
            key = self._ukey(user_id)
            mapping: dict[FieldT, EncodableT] = {k: json.dumps(v) for k, v in static.items()}
            mapping[RECENT_ITEMS] = json.dumps(list(recent))
            pipe.delete(key)  # a row replaces the whole record, dropping features it no longer has
            pipe.hset(key, mapping=mapping)
        self._call(pipe.execute)
        return len(records)

    def _append(self, events: list[Event]) -> None:
        if not events:
            return
        self._link.check_durable()
        ttl_ms = max(1, int(self.ttl_s * 1000))
        pipe = self._w.pipeline(transaction=True)  # MULTI/EXEC: push, cap and expire together
        for e in events:
            key = self._skey(e.user_id)
            pipe.lpush(key, json.dumps([e.item_id, e.type, e.ts]))
            pipe.ltrim(key, 0, self.max_events - 1)
            pipe.pexpire(key, ttl_ms)
        self._call(pipe.execute)

    # ---- reads ---------------------------------------------------------------------------------

    def get(self, user_ids: Sequence[str], now: float | None = None) -> list[UserFeatures]:
        ids = check_user_ids(user_ids)
        if not ids:
            return []
        now = time.time() if now is None else now
        pipe = self._r.pipeline(transaction=False)  # one round trip for all users
        for u in ids:
            pipe.hgetall(self._ukey(u))
            pipe.lrange(self._skey(u), 0, self.max_events - 1)
        replies = self._call(pipe.execute)
        return [self._features(u, replies[2 * i], replies[2 * i + 1], now) for i, u in enumerate(ids)]

    def _features(self, user_id: str, fields: dict[str, str], raw_events: list[str], now: float) -> UserFeatures:
        try:  # one json.loads for the whole list: the parse dominates a batch get
            events = [
                Event(user_id, item_id, type_, float(ts))
                for item_id, type_, ts in json.loads("[" + ",".join(raw_events) + "]")
            ]
        except (ValueError, TypeError) as e:
            raise DataError(
                f"Redis key {self._skey(user_id)}: malformed session event ({e}); "
                "another program wrote under this prefix - choose another prefix"
            ) from e
        session = live_session(events, now, self.ttl_s, self.max_events)
        if not fields:
            return UserFeatures(user_id, False, {}, (), session)
        try:
            recent = tuple(json.loads(fields.pop(RECENT_ITEMS, "[]")))
            static = dict(zip(fields, json.loads("[" + ",".join(fields.values()) + "]")))
        except ValueError as e:
            raise DataError(
                f"Redis key {self._ukey(user_id)}: malformed feature value ({e}); "
                "another program wrote under this prefix - choose another prefix"
            ) from e
        return UserFeatures(user_id, True, static, recent, session)

    def stats(self) -> dict[str, Any]:
        # SCAN walks the keyspace: fine for an operator's `stats`, not for the request path.
        users = self._call(self._count, f"{self.prefix}u:*")
        sessions = self._call(self._count, f"{self.prefix}s:*")
        return {
            "backend": "redis",
            "url": self.url,
            "prefix": self.prefix,
            "users": users,
            "session_users": sessions,
            "max_events": self.max_events,
            "ttl_s": self.ttl_s,
        }

    def _count(self, pattern: str) -> int:
        return sum(1 for _ in self._w.scan_iter(pattern, 1000))

    def purge_expired(self, now: float | None = None) -> int:
        """Nothing to do: every push sets the session key's PEXPIRE, so Redis drops idle sessions itself."""
        return 0

    def clear(self) -> int:
        """Delete every key under this store's prefix (tests, reloads); return how many."""
        keys = self._call(lambda: list(self._w.scan_iter(f"{self.prefix}*", 1000)))
        if keys:
            self._call(self._w.delete, *keys)
        return len(keys)

    def close(self) -> None:
        self._link.close()

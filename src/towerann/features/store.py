"""The FeatureStore contract: what a request needs to know about a user, now.

Two kinds of features meet here: static ones (loaded in bulk from the dataset, plus the user's
offline item history) and real-time session events (the click made a second ago must count).
Every backend subclasses `FeatureStore`, which holds the shared behaviour and validation, so that
the contract test suite holds for all of them alike.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from towerann.errors import BadRequest, ConfigError, DataError

DEFAULT_MAX_EVENTS = 50
DEFAULT_TTL_S = 86400.0
RECENT_ITEMS = "recent_items"  # reserved row key: the offline history, not a static feature


@dataclass(frozen=True)
class Event:
    """One real-time user event. `ts` is unix seconds; 0 or None means "now" at append time."""

    user_id: str
    item_id: str
    type: str = "click"
    ts: float = 0.0


@dataclass(frozen=True)
class UserFeatures:
    """Everything the user tower gets for one user.

    `known` is True when the user has a record in the store (put by `put_users`); unknown users
    get empty static features and history but still their session events (a new visitor's first
    clicks count too).
    """

    user_id: str
    known: bool
    static: dict[str, float | str]
    recent_items: tuple[str, ...]  # offline history, newest first
    session: tuple[Event, ...]  # real-time events, newest first, <= max_events, none older than ttl_s


class FeatureStore(ABC):
    """The contract, with the behaviour every backend shares; a backend supplies the primitives.

    Shared here: validation (ids, rows, events, limits), stamping events with the time, and
    `get_one`/`append_event(s)` over the primitives `get` and `_append`. Maintenance is the same
    on every backend: `purge_expired` reclaims expired sessions, `clear` empties the store.

    Health, for the request path: `does_io` says whether a call may wait on the network (then the
    HTTP app runs it off the event loop, under a deadline); `available()` is False while a backend
    that just failed is not being tried (calls fail fast with BackendUnavailable); `ping()` checks
    the backend now.
    """

    does_io: bool = False

    def __init__(self, max_events: int, ttl_s: float) -> None:
        self.max_events, self.ttl_s = check_limits(max_events, ttl_s)

    def available(self) -> bool:
        return True

    def ping(self) -> None:
        """Raise BackendUnavailable unless the backend answers now."""
        return None  # in process: nothing to reach (a backend on the network overrides this)

    @abstractmethod
    def put_users(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Upsert users; each row is user_id + static features (+ optional "recent_items").

        A row replaces the user's whole record (a missing "recent_items" means no history).
        """

    @abstractmethod
    def get(self, user_ids: Sequence[str], now: float | None = None) -> list[UserFeatures]:
        """Features for many users, in input order (unknown users included, known=False)."""

    def get_one(self, user_id: str, now: float | None = None) -> UserFeatures:
        check_id(user_id, "user_id")
        return self.get([user_id], now)[0]

    def append_event(self, event: Event) -> Event:
        """Store one event durably before returning; return it with `ts` filled in."""
        stored = stamp_event(event)
        self._append([stored])
        return stored

    def append_events(self, events: Sequence[Event]) -> int:
        now = time.time()
        stored = [stamp_event(e, now) for e in events]
        self._append(stored)
        return len(stored)

    @abstractmethod
    def _append(self, events: list[Event]) -> None:
        """Store validated, stamped events durably (one transaction), capped at max_events per user."""

    @abstractmethod
    def purge_expired(self, now: float | None = None) -> int:
        """Reclaim the space of sessions older than ttl_s; return how many users' sessions went."""

    @abstractmethod
    def clear(self) -> int:
        """Delete every user and session of this store; return how many records went."""

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- shared validation, so every backend accepts and rejects the same inputs -------------------


def check_limits(max_events: int, ttl_s: float) -> tuple[int, float]:
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        raise ConfigError(f"max_events must be an integer >= 1, got {max_events!r}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0 or math.isinf(ttl_s):
        raise ConfigError(f"ttl_s must be a positive finite number of seconds, got {ttl_s!r}")
    return max_events, float(ttl_s)


def check_id(value: Any, field: str) -> str:
    """Ids are non-empty strings at this boundary; ints are refused rather than guessed at."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field} must be a non-empty string, got {value!r}; pass str(id)")
    return value


def check_user_ids(user_ids: Sequence[str]) -> list[str]:
    if isinstance(user_ids, str):
        raise BadRequest("user_ids must be a sequence of strings, not one string; use get_one() for one user")
    return [check_id(u, "user_id") for u in user_ids]


def stamp_event(event: Event, now: float | None = None) -> Event:
    """Validate an event and fill a missing ts with the current time."""
    if not isinstance(event, Event):
        raise BadRequest(f"expected an Event, got {type(event).__name__}")
    check_id(event.user_id, "event.user_id")
    check_id(event.item_id, "event.item_id")
    check_id(event.type, "event.type")
    ts = event.ts
    if ts is None or ts == 0:
        return Event(event.user_id, event.item_id, event.type, time.time() if now is None else now)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise BadRequest(f"event.ts must be unix seconds (a finite number >= 0, or 0 for now), got {ts!r}")
    return event if isinstance(ts, float) else Event(event.user_id, event.item_id, event.type, float(ts))


def normalize_row(row: Mapping[str, Any]) -> tuple[str, dict[str, float | str], tuple[str, ...]]:
    """Split a put_users row into (user_id, static features, recent_items).

    Numbers (and bools) become float, strings stay strings; None/NaN mean "missing" and are
    dropped, so a sparse users table round-trips without inventing values.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"a user row must be a mapping with a 'user_id', got {type(row).__name__}")
    if "user_id" not in row:
        raise DataError(f"user row has no 'user_id' field (fields: {sorted(map(str, row))[:10]})")
    user_id = check_id(row["user_id"], "user_id")
    static: dict[str, float | str] = {}
    for key, value in row.items():
        if key in ("user_id", RECENT_ITEMS):
            continue
        if not isinstance(key, str) or not key:
            raise DataError(f"user {user_id!r}: feature names must be non-empty strings, got {key!r}")
        if value is None:
            continue
        if isinstance(value, str):
            static[key] = value
        elif isinstance(value, (bool, int, float)) or _is_numpy_number(value):
            f = float(value)
            if not math.isnan(f):
                static[key] = f
        else:
            raise DataError(
                f"user {user_id!r}: feature {key!r} has type {type(value).__name__}; "
                "static features must be numbers or strings"
            )
    recent = row.get(RECENT_ITEMS)
    if recent is None:
        items: tuple[str, ...] = ()
    elif isinstance(recent, str) or not isinstance(recent, Iterable):
        raise DataError(f"user {user_id!r}: 'recent_items' must be a list of item id strings, got {recent!r}")
    else:
        items = tuple(check_id(i, f"user {user_id!r} recent_items entry") for i in recent)
    return user_id, static, items


def _is_numpy_number(value: Any) -> bool:
    # numpy scalars are not int/float subclasses (except float64); accept them by duck type
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "biuf"


def live_session(events: Iterable[Event], now: float, ttl_s: float, max_events: int) -> tuple[Event, ...]:
    """Newest first by ts (ties: later arrival first), capped, none older than ttl_s."""
    cutoff = now - ttl_s
    kept = [e for e in events if e.ts >= cutoff]  # input is arrival order, newest first
    kept.sort(key=lambda e: e.ts, reverse=True)  # stable: equal ts keep arrival order
    return tuple(kept[:max_events])

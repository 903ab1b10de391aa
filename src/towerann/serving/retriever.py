"""The request flow as one Python call: features >> user tower >> ANN top-K >> external ids.

    retriever = Retriever(BundleHolder(RetrievalBundle.load("indexes/")), open_store("embedded"))
    retriever.candidates("u42", k=100, filter={"categories": ["c001"], "brand": ["acme", "zenith"]})
    retriever.record_event("u42", "1234")        # visible to the next candidates() call

The HTTP app is a thin shell around this class; everything it answers, this answers. The app calls
the `*_async` twins, which differ in one thing only: a feature store that does network IO (Redis)
is called off the event loop, under a deadline, so a slow or dead Redis never stalls the server.

When the feature store is down or misses its deadline, candidates still come back, from the
user tower with no features (the cold-start path an unknown user takes) and `degraded=True`; a
click that cannot be stored is refused (BackendUnavailable, HTTP 503), never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from towerann.data.attributes import attribute_key
from towerann.data.vectors_dir import UNKNOWN_CATEGORY
from towerann.errors import BackendUnavailable, BadRequest, NotFound
from towerann.features import Event, FeatureStore, UserFeatures
from towerann.index import Filter
from towerann.serving.bundle import NO_USER_TOWER, RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.monitor import RecallMonitor
from towerann.serving.query import check_query_vector

log = logging.getLogger(__name__)

STAGES = ("features", "user_tower", "ann", "total")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# the argument and the result of a call made off the event loop
A = TypeVar("A")
R = TypeVar("R")


@dataclass(frozen=True)
class Candidates:
    item_ids: list[int | str]  # as the catalog gives them
    scores: list[float]
    model_version: str
    index_version: str
    timings_ms: dict[str, float]  # features, user_tower, ann, total
    degraded: bool = False  # the feature store did not answer: ranked without the user's features
    # a sharded index answered without these shards (late or restarting): the best of the others' items
    missing_shards: tuple[int, ...] = ()

    @property
    def partial(self) -> bool:
        return bool(self.missing_shards)


class Retriever:
    def __init__(
        self,
        holder: BundleHolder,
        store: FeatureStore,
        max_k: int = 1000,
        *,
        max_id_length: int = 256,
        max_clock_skew_s: float = 300.0,
        features_timeout_s: float = 0.1,
        write_timeout_s: float = 1.0,
        io_workers: int = 4,
        monitor: RecallMonitor | None = None,
    ):
        self.holder = holder
        self.monitor = monitor  # replays a sample of the answers with exact search (serving.monitor)
        self.store = store
        self.max_k = int(max_k)
        self.max_id_length = int(max_id_length)
        self.max_clock_skew_s = float(max_clock_skew_s)
        self.features_timeout_s = float(features_timeout_s)
        self.write_timeout_s = float(write_timeout_s)
        # Only a store that waits on the network gets threads; the embedded store is called inline.
        self._io = ThreadPoolExecutor(io_workers, thread_name_prefix="towerann-store") if store.does_io else None
        self.degraded = DegradedState()  # answers ranked without the user's features: on / off, logged once each

    # ---- candidates -------------------------------------------------------------------------------

    def candidates(
        self,
        user_id: str | int | None,
        k: int,
        filter: dict[str, Any] | None = None,
        *,
        query_vector: Sequence[float] | None = None,
    ) -> Candidates:
        """Top-k items for this user now, counting their session events up to this call; or, given
        `query_vector` instead of a user (a caller that runs the user tower itself), for that vector."""
        t0 = time.perf_counter()
        if query_vector is not None or user_id is None:
            return self._for_vector(user_id, query_vector, k, filter, t0)
        user_id, b, flt = self._check(user_id, k, filter)
        why = None
        try:
            f: UserFeatures | None = self.store.get_one(user_id)
        except BackendUnavailable as e:
            f, why = None, str(e)
        return self._rank(b, user_id, k, flt, f, t0, why)

    async def candidates_async(
        self,
        user_id: str | int | None,
        k: int,
        filter: dict[str, Any] | None = None,
        *,
        query_vector: Sequence[float] | None = None,
    ) -> Candidates:
        """candidates() for an event loop: the store's network IO off the loop, within features_timeout_s."""
        t0 = time.perf_counter()
        if query_vector is not None or user_id is None:
            return self._for_vector(user_id, query_vector, k, filter, t0)  # no store, no tower: nothing to wait on
        user_id, b, flt = self._check(user_id, k, filter)
        store, why = self.store, None
        if self._io is None:
            f: UserFeatures | None = store.get_one(user_id)  # in memory: microseconds, no thread hop
        elif not store.available():
            f, why = None, "the feature store failed a moment ago"  # don't wait on it again yet
        else:
            try:
                f = await self._off_loop(store.get_one, user_id, timeout_s=self.features_timeout_s, what="read")
            except BackendUnavailable as e:
                f, why = None, str(e)
        # Index writes run on this loop too (serving.app.on_loop): none can overlap the search below.
        return self._rank(b, user_id, k, flt, f, t0, why)

    def _check(self, user_id: Any, k: Any, filter: Any) -> tuple[str, RetrievalBundle, Filter | None]:
        user_id = self.check_id(user_id, "user_id")
        b, flt = self._check_k_filter(k, filter)
        if not b.has_user_tower:  # before the store is asked: there is no tower to feed
            raise BadRequest(NO_USER_TOWER)
        return user_id, b, flt

    def _check_k_filter(self, k: Any, filter: Any) -> tuple[RetrievalBundle, Filter | None]:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.max_k:
            raise BadRequest(f"k must be an integer between 1 and {self.max_k}, got {k!r}")
        b = self.holder.current()  # read once: the whole request uses one bundle version
        return b, self._filter(b, filter)

    def _for_vector(self, user_id: Any, query_vector: Any, k: Any, filter: Any, t0: float) -> Candidates:
        """The search alone, for a query vector the caller made: same filters, same exact-k search."""
        if (user_id is None) == (query_vector is None):
            raise BadRequest(
                "give either user_id or query_vector (a user tower output), not both"
                if user_id is not None
                else "give user_id, or query_vector (a user tower output)"
            )
        b, flt = self._check_k_filter(k, filter)
        query = check_query_vector(query_vector, b.index.dim)
        t1 = time.perf_counter()
        return self._search(b, query, k, flt, t0, t1, t1, degraded=False)

    def _rank(
        self,
        b: RetrievalBundle,
        user_id: str,
        k: int,
        flt: Filter | None,
        f: UserFeatures | None,
        t0: float,
        why: str | None = None,
    ) -> Candidates:
        degraded = f is None
        if degraded is not self.degraded.on:  # a transition (rare): logged once
            self.degraded.turn(degraded, why)
        if f is None:  # no features to be had: the cold-start path an unknown user takes
            f = UserFeatures(user_id, False, {}, (), ())
        history = self._history(b, f.session, f.recent_items)
        t1 = time.perf_counter()
        query = b.encoder.encode(user_id, f.static, history)
        return self._search(b, query, k, flt, t0, t1, time.perf_counter(), degraded)

    def _search(
        self,
        b: RetrievalBundle,
        query: np.ndarray,
        k: int,
        flt: Filter | None,
        t0: float,
        t1: float,
        t2: float,
        degraded: bool,
    ) -> Candidates:
        res = b.index.search(query[None, :], k, filter=flt)
        t3 = time.perf_counter()
        ids, scores = res.ids[0], res.scores[0]
        if self.monitor is not None:
            self.monitor.offer(b, query, k, flt, ids)  # a random draw; a drawn sample is queued, never waited on
        n = int(np.count_nonzero(ids >= 0))  # rows are padded with -1 at the end when fewer qualify
        items = b.external_ids[ids[:n]].tolist()
        t4 = time.perf_counter()
        # The versions come from the parts that did the work (the encoder, the index searched), not
        # from the bundle's labels, so a request that paired parts of two bundles would show it.
        return Candidates(
            items,
            scores[:n].tolist(),
            # a vectors-only bundle without a user tower: its space id; with one, that tower's version
            b.encoder.model_version if b.has_user_tower else b.model_version,
            b.index.version or b.version,
            {
                "features": (t1 - t0) * 1e3,
                "user_tower": (t2 - t1) * 1e3,
                "ann": (t3 - t2) * 1e3,
                "total": (t4 - t0) * 1e3,
            },
            degraded,
            tuple(int(s) for s in res.missing_shards),
        )

    # ---- events -----------------------------------------------------------------------------------

    def record_event(
        self, user_id: str | int, item_id: str | int, type: str = "click", ts: float | None = None
    ) -> Event:
        """Store one event (durably, before returning); unknown items are refused."""
        return self.store.append_event(self._event(user_id, item_id, type, ts))

    async def record_event_async(
        self, user_id: str | int, item_id: str | int, type: str = "click", ts: float | None = None
    ) -> Event:
        """record_event() for an event loop: a network store is written off the loop, within write_timeout_s."""
        event = self._event(user_id, item_id, type, ts)
        if self._io is None:
            return self.store.append_event(event)
        if not self.store.available():
            raise BackendUnavailable(
                "the feature store is unavailable (it failed a moment ago); the event was not stored: retry it later"
            )
        return await self._off_loop(self.store.append_event, event, timeout_s=self.write_timeout_s, what="write")

    def _event(self, user_id: Any, item_id: Any, type: Any, ts: Any) -> Event:
        user_id = self.check_id(user_id, "user_id")
        type = self.check_id(type, "type")
        b = self.holder.current()
        item_id = self.item_key(item_id, b)
        if item_id not in b.item_internal:
            raise NotFound(
                f"item_id {item_id!r} is not in the served catalog (bundle {b.version}); "
                "send ids as the catalog gives them"
            )
        if ts is None or (not isinstance(ts, bool) and isinstance(ts, (int, float)) and ts == 0):
            return Event(user_id, item_id, type, 0.0)  # the store stamps it with the time
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise BadRequest(f"ts must be unix seconds (a finite number), got {ts!r}")
        now, ttl = time.time(), self.store.ttl_s
        if not now - ttl <= ts <= now + self.max_clock_skew_s:
            raise BadRequest(
                f"ts {ts!r} is outside the session window: an event's ts must lie within the last "
                f"{ttl:g} s ([features] ttl_s) and at most {self.max_clock_skew_s:g} s ahead of the "
                "server's clock ([serve] max_clock_skew_s); omit it to mean now"
            )
        return Event(user_id, item_id, type, float(ts))

    # ---- ids --------------------------------------------------------------------------------------

    def check_id(self, value: Any, field: str) -> str:
        """A user, item or type id as a string: JSON integers are accepted and spelled in decimal."""
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                value = str(value)
            except ValueError:  # more digits than Python converts
                raise BadRequest(f"{field}: an integer of more than {self.max_id_length} digits") from None
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{field} must be a non-empty string or an integer, got {value!r}")
        if len(value) > self.max_id_length:
            raise BadRequest(
                f"{field} is {len(value)} characters long; at most {self.max_id_length} are accepted "
                "([serve] max_id_length)"
            )
        return value

    def item_key(self, item_id: Any, bundle: RetrievalBundle | None = None) -> str:
        """The catalog's id for `item_id` (a string or a JSON integer); an integer id outside int64 on a catalog
        of integer ids is no item of it (NotFound), whatever the lookup underneath would make of it."""
        key = self.check_id(item_id, "item_id")
        b = bundle or self.holder.current()
        if b.external_ids.dtype.kind in "iu" and not int64_spelling_in_range(key):
            raise NotFound(
                f"item_id {key!r} is not in the served catalog (bundle {b.version}): this catalog's "
                "ids are 64-bit integers"
            )
        return key

    # ---- off the event loop -----------------------------------------------------------------------

    async def _off_loop(self, fn: Callable[[A], R], arg: A, *, timeout_s: float, what: str) -> R:
        assert self._io is not None
        future = asyncio.get_running_loop().run_in_executor(self._io, fn, arg)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise BackendUnavailable(
                f"the feature store did not answer a {what} within {timeout_s * 1e3:.0f} ms"
                + ("; the event is not acknowledged: retry it" if what == "write" else "")
            ) from None

    def close(self) -> None:
        """Stop the store's worker threads and the recall monitor (the store itself is closed by whoever opened it)."""
        if self.monitor is not None:
            self.monitor.close()
        if self._io is not None:
            self._io.shutdown(wait=False, cancel_futures=True)

    # ---- request parts ----------------------------------------------------------------------------

    @staticmethod
    def _history(b: RetrievalBundle, session: tuple[Event, ...], recent: tuple[str, ...]) -> list[tuple[str, int]]:
        """Session events newest first, then offline history; deduped, cut to the tower's length."""
        out: list[tuple[str, int]] = []
        seen: set[str] = set()
        lookup, cats, n = b.item_internal, b.item_model_cat, b.history_len
        for item in (*(e.item_id for e in session), *recent):
            if item in seen:
                continue
            seen.add(item)
            internal = lookup.get(item)
            out.append((item, int(cats[internal]) if internal is not None else 0))
            if len(out) >= n:
                break
        return out

    @staticmethod
    def _filter(b: RetrievalBundle, filter: dict[str, Any] | None) -> Filter | None:
        """{"categories": [names], <attribute>: [values], ...} -> an index Filter: an item must match
        every key given (AND), and match a key when its value is any of the listed ones (OR)."""
        if filter is None:
            return None
        known = _listed(["categories", *b.attribute_values])
        if not isinstance(filter, dict):
            raise BadRequest(f"filter must be an object whose keys are among {known}, each a list of values")
        unknown = [str(key)[:64] for key in filter if key != "categories" and key not in b.attribute_values]
        if unknown:
            raise BadRequest(f"filter.{unknown[0]}: not a filter of this bundle; it filters on {known}")
        categories = None
        attributes = {}
        for key, values in filter.items():
            if values is None:
                continue
            if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
                raise BadRequest(f"filter.{key} must be a non-empty list of values, got {str(values)[:100]!r}")
            if key == "categories":
                vocab, names = b.category_code, b.category_names
                keys = [v if isinstance(v, str) else None for v in values]
            else:
                vocab, names = b.attribute_code[key], b.attribute_values[key]
                keys = [_value_key(v) for v in values]
            codes = []
            for value, k in zip(values, keys):
                code = vocab.get(k) if k is not None else None
                if code is None:
                    what = "category" if key == "categories" else f"{key} value"
                    shown = _listed([n for n in names if n != UNKNOWN_CATEGORY][:5], "and")
                    raise BadRequest(f"filter.{key}: unknown {what} {str(value)[:100]!r}; known ones include {shown}")
                codes.append(code)
            if key == "categories":
                categories = frozenset(codes)
            else:
                attributes[key] = frozenset(codes)
        if categories is None and not attributes:
            return None
        return Filter(categories=categories, attributes=tuple(attributes.items()))


class DegradedState:
    """Whether the latest answer that asked the feature store was ranked without the user's features, and
    one log line per change: `degraded on` when answers start going without them (the store is down or
    misses its deadline), `degraded off` when the store answers again. Answers for a query vector never
    ask the store, so they change nothing."""

    def __init__(self) -> None:
        self.on = False
        self._since = 0.0
        self._lock = threading.Lock()  # Python callers may search from several threads

    def turn(self, on: bool, why: str | None = None) -> None:
        with self._lock:
            if on is self.on:  # another thread logged this change first
                return
            self.on, now = on, time.monotonic()
            seconds, self._since = now - self._since, now
        if on:
            log.warning(
                "degraded on: candidates are ranked without the user's features (%s); the store is retried "
                "every [features] retry_s",
                " ".join((why or "the feature store did not answer").split()),
                extra={"event": "degraded_on"},
            )
        else:
            log.info(
                "degraded off: the feature store answers again; candidates use the user's features (degraded "
                "for %.1fs)",
                seconds,
                extra={"event": "degraded_off", "seconds": round(seconds, 3)},
            )


def _listed(names: Sequence[str], last: str = "or") -> str:
    """["categories", "brand", "in_stock"] -> "categories, brand or in_stock": a list in words, not a repr."""
    names = list(names)
    return ", ".join(names[:-1]) + f" {last} " + names[-1] if len(names) > 1 else "".join(names)


def _value_key(value: Any) -> str | None:
    try:
        return attribute_key(value)
    except BadRequest:
        return None


def int64_spelling_in_range(item_id: str) -> bool:
    """False only for a decimal integer outside int64 (which an int64 id lookup must never see)."""
    digits = item_id[1:] if item_id[:1] in "+-" else item_id
    if not (digits.isascii() and digits.isdigit()):
        return True  # not an integer spelling: the lookup finds no such item itself
    return len(digits) <= 19 and INT64_MIN <= int(item_id) <= INT64_MAX

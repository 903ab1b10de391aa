"""The request flow as one Python call: features >> user tower >> ANN top-K >> external ids.

    retriever = Retriever(BundleHolder(RetrievalBundle.load("indexes/")), open_store("embedded"))
    retriever.candidates("u42", k=100, filter={"categories": ["c001"]})
    retriever.record_event("u42", "1234")        # visible to the next candidates() call

The HTTP app is a thin shell around this class; everything it answers, this answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from towerann.errors import BadRequest, NotFound
from towerann.features import Event, FeatureStore
from towerann.index import Filter
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder

log = logging.getLogger(__name__)

STAGES = ("features", "user_tower", "ann", "total")


@dataclass(frozen=True)
class Candidates:
    item_ids: list[int | str]  # as the catalog gives them
    scores: list[float]
    model_version: str
    index_version: str
    timings_ms: dict[str, float]  # features, user_tower, ann, total


class Retriever:
    def __init__(self, holder: BundleHolder, store: FeatureStore, max_k: int = 1000):
        self.holder = holder
        self.store = store
        self.max_k = int(max_k)

    def candidates(self, user_id: str, k: int, filter: dict[str, Any] | None = None) -> Candidates:
        """Top-k items for this user now, counting their session events up to this call."""
        t0 = time.perf_counter()
        if not isinstance(user_id, str) or not user_id:
            raise BadRequest(f"user_id must be a non-empty string, got {user_id!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.max_k:
            raise BadRequest(f"k must be an integer between 1 and {self.max_k}, got {k!r}")
        b = self.holder.current()  # read once: the whole request uses one bundle version
        flt = self._filter(b, filter)
        f = self.store.get_one(user_id)  # unknown user: known=False, empty static, session only (cold start)
        history = self._history(b, f.session, f.recent_items)
        t1 = time.perf_counter()
        query = b.encoder.encode(user_id, f.static, history)
        t2 = time.perf_counter()
        res = b.index.search(query[None, :], k, filter=flt)
        t3 = time.perf_counter()
        ids, scores = res.ids[0], res.scores[0]
        n = int(np.count_nonzero(ids >= 0))  # rows are padded with -1 at the end when fewer qualify
        items = b.external_ids[ids[:n]].tolist()
        t4 = time.perf_counter()
        # The versions come from the parts that did the work (the encoder, the index searched), not
        # from the bundle's labels, so a request that paired parts of two bundles would show it.
        return Candidates(items, scores[:n].tolist(), b.encoder.model_version, b.index.version or b.version, {
            "features": (t1 - t0) * 1e3, "user_tower": (t2 - t1) * 1e3, "ann": (t3 - t2) * 1e3,
            "total": (t4 - t0) * 1e3})

    def record_event(self, user_id: str, item_id: str, type: str = "click", ts: float | None = None) -> Event:
        """Store one event (durably, before returning); unknown items are refused."""
        b = self.holder.current()
        if not isinstance(item_id, str) or item_id not in b.item_internal:
            raise NotFound(f"item_id {item_id!r} is not in the served catalog (bundle {b.version}); "
                           "send ids as the catalog gives them, as strings")
        return self.store.append_event(Event(user_id, item_id, type, 0.0 if ts is None else ts))

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
        if filter is None:
            return None
        if not isinstance(filter, dict) or set(filter) - {"categories"}:
            raise BadRequest(f"filter must be an object with only 'categories' (a list of category names), got {filter!r}")
        names = filter.get("categories")
        if names is None:
            return None
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise BadRequest(f"filter.categories must be a non-empty list of category names, got {names!r}")
        codes = []
        for name in names:
            code = b.category_code.get(name) if isinstance(name, str) else None
            if code is None:
                raise BadRequest(f"filter.categories: unknown category {name!r}; known e.g. {b.category_names[:5]}")
            codes.append(code)
        return Filter(categories=frozenset(codes))

"""BundleHolder: the bundle being served now, swapped atomically as a whole.

A request calls `current()` once and uses that bundle throughout, so a swap in the middle of a
request never pairs the old user tower with the new index. Reading an attribute is atomic in
CPython, so readers take no lock; swaps are serialised so listeners see swaps in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from towerann.errors import BackendUnavailable
from towerann.serving.bundle import RetrievalBundle

log = logging.getLogger(__name__)


class BundleHolder:
    def __init__(self, bundle: RetrievalBundle | None = None):
        self._bundle = bundle
        self._lock = threading.Lock()
        self._listeners: list[Callable[[RetrievalBundle], None]] = []

    def subscribe(self, listener: Callable[[RetrievalBundle], None]) -> None:
        """Call `listener(bundle)` now (if one is loaded) and after every swap (e.g. to update metrics)."""
        with self._lock:
            self._listeners.append(listener)
            if self._bundle is not None:
                listener(self._bundle)

    @property
    def ready(self) -> bool:
        return self._bundle is not None

    def current(self) -> RetrievalBundle:
        bundle = self._bundle
        if bundle is None:
            raise BackendUnavailable("no retrieval bundle is loaded yet; wait for /readyz or check the index path")
        return bundle

    def swap(self, new: RetrievalBundle) -> RetrievalBundle | None:
        """Serve `new` from now on; return the previous bundle (requests in flight may still use it)."""
        with self._lock:
            old, self._bundle = self._bundle, new
            for listener in self._listeners:
                listener(new)
        log.info("serving bundle %s (model %s)", new.version, new.model_version)
        return old

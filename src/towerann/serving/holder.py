"""BundleHolder: the bundle being served now, swapped atomically as a whole.

A request calls `current()` once and uses that bundle throughout, so a swap in the middle of a
request never pairs the old user tower with the new index. Reading an attribute is atomic in
CPython, so readers take no lock; swaps are serialised so listeners see swaps in order.

`relabel` renames the served bundle in place when its search settings were changed live and published
as a new snapshot version (serving.retune_loop): the files are the same (hard links), so serving that
version needs no reload, and the CURRENT watcher sees it served already.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    def relabel(self, bundle: RetrievalBundle, path: Path, manifest: dict[str, Any] | None = None) -> bool:
        """The served `bundle` is now snapshot version `path` (same files, the search settings it already
        searches with): rename it (and its index) to that version and tell the listeners as after a swap.
        False, and nothing changed, when `bundle` is no longer the one served."""
        with self._lock:
            if self._bundle is not bundle:
                return False
            old = bundle.version
            bundle.path, bundle.version = Path(path), Path(path).name
            bundle.index.version = bundle.version
            if manifest is not None:
                bundle.index.manifest = manifest
            for listener in self._listeners:
                listener(bundle)
        log.info("serving bundle %s as %s (same files, settings published)", old, bundle.version)
        return True

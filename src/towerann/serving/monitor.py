"""Online recall monitor: replay a sample of live requests with exact search, off the request path.

    monitor = RecallMonitor(holder, sample=0.01, threshold=0.9)
    monitor.offer(bundle, query, k, flt, ids)   # on the request path: a random draw + a non-blocking put
    monitor.snapshot()                          # {"bundles": {version: {filter kind: {recall, samples, ...}}}}

A drawn request (its query vector, k, filter and the internal ids the index returned) goes into a
bounded queue; when the queue is full it is dropped and counted, never waited for. One daemon thread
at nice 19 takes each sample and, if the bundle it was answered from is still the one served, runs
`index.exact_search` with the same k and filter over that same bundle object; recall@k is
|answered ∩ exact| / |exact| (tune.recall_at_k's definition, one row). Per bundle version and filter
kind ("none", "category", "attribute": any attribute condition, with or without categories) it keeps
the mean over the last WINDOW samples; a mean under `threshold` (once MIN_SAMPLES are in) marks that
bundle unhealthy, logged once as a warning when it happens.

Why a lock (`guard`): exact search reads the index's vector storage in place (HNSW hands out a raw
view of faiss' buffer, which an add may reallocate), so it must not overlap an index write. The
request path needs no lock (writes run on the event loop between handlers); this thread does, and
the service passes the writers' lock (freshness.live.ItemWriter.lock), which also covers swaps: a
sample whose bundle was swapped out is dropped (reason "stale") and never searched, so the queue
holds bundles only by weak reference and never delays the release of a swapped-out bundle.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from towerann.index import Filter
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder

log = logging.getLogger(__name__)

FILTER_KINDS = ("none", "category", "attribute")
WINDOW = 1000  # samples in the reported mean per (bundle version, filter kind)
MIN_SAMPLES = 20  # a mean of fewer samples is reported but never judged against the threshold
KEEP_VERSIONS = 2  # bundle versions kept in the stats: the served one and the one before it

# listener(version, filter kind, recall of this sample, window mean) and drop listener(reason)
SampleListener = Callable[[str, str, float, float], None]
DropListener = Callable[[str], None]
ForgetListener = Callable[[str, str], None]


def filter_kind(flt: Filter | None) -> str:
    if flt is None or flt.empty:
        return "none"
    return "attribute" if flt.attributes else "category"


def recall_of(found: np.ndarray, truth: np.ndarray) -> float | None:
    """|found ∩ truth| / |truth| for one row of internal ids (-1 padding ignored); None: no truth."""
    t = truth[truth >= 0]
    if len(t) == 0:
        return None
    return len(np.intersect1d(found[found >= 0], t)) / len(t)


def lower_this_threads_priority(nice: int) -> None:
    """Give the calling thread alone this nice value, or keep its own if that is higher already
    (Linux: a thread is a task with its own), so background work in a serving process yields the
    cores to the request threads; best effort elsewhere."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, max(nice, os.getpriority(os.PRIO_PROCESS, me)))
    except (OSError, AttributeError):
        pass


@dataclass
class _Stats:
    window: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    samples: int = 0
    unhealthy: bool = False

    @property
    def mean(self) -> float:
        return float(sum(self.window) / len(self.window)) if self.window else float("nan")


class RecallMonitor:
    def __init__(
        self,
        holder: BundleHolder,
        sample: float = 0.01,
        threshold: float = 0.9,
        queue_size: int = 64,
        guard: AbstractContextManager[Any] | None = None,
        start: bool = True,
        max_busy: float = 1.0,
    ):
        self.holder = holder
        self.sample, self.threshold = float(sample), float(threshold)
        # Duty cycle: after a sample that took t s, none is taken for t / max_busy - t s (see config).
        self.max_busy = float(max_busy)
        self._idle_until = 0.0  # time.monotonic() before which offers are dropped as "busy"
        self.guard: AbstractContextManager[Any] = guard or nullcontext()
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max(1, int(queue_size)))
        self._draw = random.random
        self._lock = threading.Lock()  # the stats: written by the worker, read by /metrics and the admin route
        self._stats: dict[str, dict[str, _Stats]] = {}
        self.dropped: dict[str, int] = {"queue_full": 0, "stale": 0, "busy": 0}
        self._on_sample: list[SampleListener] = []
        self._on_drop: list[DropListener] = []
        self._on_forget: list[ForgetListener] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        if start and self.sample > 0:
            self._thread = threading.Thread(target=self._run, name="towerann-recall-monitor", daemon=True)
            self._thread.start()

    def listen(self, on_sample: SampleListener, on_drop: DropListener, on_forget: ForgetListener) -> None:
        """Metrics hooks: each sample scored, each sample dropped, a (version, kind) no longer kept."""
        self._on_sample.append(on_sample)
        self._on_drop.append(on_drop)
        self._on_forget.append(on_forget)

    # ---- the request path ---------------------------------------------------------------------------

    def offer(self, bundle: RetrievalBundle, query: np.ndarray, k: int, flt: Filter | None, ids: np.ndarray) -> None:
        """Maybe queue this answered request for replay: a random draw and a put that never waits."""
        if self._draw() >= self.sample:
            return
        if time.monotonic() < self._idle_until:
            self._dropped("busy")
            return
        try:
            self._queue.put_nowait((weakref.ref(bundle), query, k, flt, ids))
        except queue.Full:
            self._dropped("queue_full")

    # ---- the worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        lower_this_threads_priority(19)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self._closing:
                    t0 = time.monotonic()
                    self.process(*item)
                    spent = time.monotonic() - t0
                    self._idle_until = time.monotonic() + spent * (1.0 / self.max_busy - 1.0)
            except Exception:  # a bad sample must not end the monitor
                log.exception("recall monitor: scoring a sample")
            finally:
                self._queue.task_done()

    def process(
        self,
        bundle_ref: Callable[[], RetrievalBundle | None],
        query: np.ndarray,
        k: int,
        flt: Filter | None,
        ids: np.ndarray,
    ) -> float | None:
        """Exact search for one sample on the bundle that answered it; record and return its recall."""
        with self.guard:  # no index write or swap while the exact search reads the index
            bundle = bundle_ref()
            if bundle is None or not self.holder.ready or self.holder.current() is not bundle:
                del bundle
                self._dropped("stale")
                return None
            truth = bundle.index.exact_search(query[None, :], k, filter=flt).ids[0]
            version = bundle.version
            del bundle  # before the guard is let go: a swap right after must see no reference of ours
        recall = recall_of(ids, truth)
        if recall is not None:
            self._record(version, filter_kind(flt), recall)
        return recall

    def _record(self, version: str, kind: str, recall: float) -> None:
        forgotten: list[tuple[str, str]] = []
        with self._lock:
            if version not in self._stats:
                while len(self._stats) >= KEEP_VERSIONS:
                    old = next(iter(self._stats))
                    forgotten += [(old, kind_) for kind_ in self._stats.pop(old)]
                self._stats[version] = {}
            s = self._stats[version].setdefault(kind, _Stats())
            s.window.append(recall)
            s.samples += 1
            mean = s.mean
            low = self.threshold > 0 and len(s.window) >= MIN_SAMPLES and mean < self.threshold
            changed, s.unhealthy = low != s.unhealthy, low
        if changed and low:
            log.warning(
                "recall monitor: bundle %s, filter %s: recall@k vs exact search %.3f over the last %d samples "
                "is under the threshold %.3f ([monitor] threshold)",
                version,
                kind,
                mean,
                min(s.samples, WINDOW),
                self.threshold,
            )
        elif changed:
            log.info(
                "recall monitor: bundle %s, filter %s: recall %.3f is back at or over the threshold %.3f",
                version,
                kind,
                mean,
                self.threshold,
            )
        for v, kind_ in forgotten:
            for forget in self._on_forget:
                forget(v, kind_)
        for listener in self._on_sample:
            listener(version, kind, recall, mean)

    def _dropped(self, reason: str) -> None:
        self.dropped[reason] += 1  # a lost increment under a race costs a count, never a request
        for listener in self._on_drop:
            listener(reason)

    # ---- reports ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The admin route's answer: per bundle version and filter kind, the window mean and sample sizes."""
        with self._lock:
            bundles = {
                v: {
                    kind: {
                        "recall": None if not s.window else round(s.mean, 4),
                        "window": len(s.window),
                        "samples": s.samples,
                        "healthy": not s.unhealthy,
                    }
                    for kind, s in kinds.items()
                }
                for v, kinds in self._stats.items()
            }
        return {
            "sample": self.sample,
            "threshold": self.threshold,
            "window": WINDOW,
            "min_samples": MIN_SAMPLES,
            "queued": self._queue.qsize(),
            "dropped": dict(self.dropped),
            "bundles": bundles,
        }

    def health(self, version: str | None) -> dict[str, Any]:
        """For /readyz: is this bundle's recall (each filter kind judged) at or over the threshold?"""
        with self._lock:
            kinds = dict(self._stats.get(version or "", {}))
            below = {kind: round(s.mean, 4) for kind, s in kinds.items() if s.unhealthy}
            samples = sum(s.samples for s in kinds.values())
        return {"healthy": not below, "threshold": self.threshold, "samples": samples, "below": below}

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued sample is scored (tests, benchmarks); False if that took over timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        """Stop the worker; samples still queued are not scored."""
        if self._thread is not None:
            self._closing = True
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:  # the worker is stuck in a search; it is a daemon thread
                pass
            self._thread.join(timeout=5)
            self._thread = None

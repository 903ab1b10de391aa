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

A sample is recorded under the version its request was answered from (read when it was offered): a
live re-tune (serving.retune_loop) renames the served bundle in place, and a sample answered at the old
setting must not count for the new version.

The reservoir of live queries (`LiveQueries`, [monitor] reservoir): every drawn request's query vector,
with its k and filter (category and attribute *values*, as a request names them) and the second it came,
and nothing else (no user id, no request id), goes into a bounded reservoir on the request path (before
the queue, so a busy monitor does not starve it): reservoir sampling (Algorithm R) over the drawn
requests; a query older than reservoir_max_age_s is dropped when the reservoir is saved or read, and the
count of requests seen restarts from what is left, so the freed slots go to the next requests (the
reservoir follows recent traffic). It is tied to the user tower it came from: a bundle of another model
empties it. Written under the served root (index.retune.write_live_queries: ROOT/live_queries/<writer>/,
a temporary directory renamed into place) every reservoir_save_s and on close, read back on start, so a
restart keeps it; each worker process writes its own directory, readers merge them.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from towerann.errors import TowerannError
from towerann.index import Filter
from towerann.index.retune import LIVE_QUERIES, read_live_queries, read_live_writer, write_live_queries
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


_manners_lock = threading.Lock()
_manners_users = 0
_manners_before: tuple[float, int] = (0.005, 1)


@contextmanager
def background_manners(switch_s: float = 0.0005) -> Iterator[None]:
    """While background work (a bundle's load, validation and replay; a live re-tune) runs beside the
    requests: hand the GIL back every 0.5 ms instead of every 5 ms, and keep BLAS and OpenMP to one
    thread, so the requests being served keep a core and the GIL. Both settings are the process's:
    the first of overlapping users sets them, the last one out puts them back."""
    import faiss
    from threadpoolctl import threadpool_limits

    global _manners_users, _manners_before
    with _manners_lock:
        if _manners_users == 0:
            _manners_before = (sys.getswitchinterval(), faiss.omp_get_max_threads())
            sys.setswitchinterval(switch_s)
            faiss.omp_set_num_threads(1)
        _manners_users += 1
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        with _manners_lock:
            _manners_users -= 1
            if _manners_users == 0:
                sys.setswitchinterval(_manners_before[0])
                faiss.omp_set_num_threads(_manners_before[1])


def lower_this_threads_priority(nice: int) -> None:
    """Give the calling thread alone this nice value, or keep its own if that is higher already
    (Linux: a thread is a task with its own), so background work in a serving process yields the
    cores to the request threads; best effort elsewhere."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, max(nice, os.getpriority(os.PRIO_PROCESS, me)))
    except (OSError, AttributeError):
        pass


def filter_spec(bundle: RetrievalBundle, flt: Filter | None) -> dict[str, list[str]] | None:
    """A filter as a request names it ({"categories": [names], attribute: [values]}), from its codes."""
    if flt is None or flt.empty:
        return None
    spec: dict[str, list[str]] = {}
    if flt.categories is not None:
        spec["categories"] = sorted(bundle.category_names[c] for c in flt.categories)
    for name, codes in flt.attributes:
        spec[name] = sorted(bundle.attribute_values[name][c] for c in codes)
    return spec


class LiveQueries:
    """A bounded reservoir of live query vectors with their k and filter (see the module docstring)."""

    def __init__(
        self,
        size: int,
        max_age_s: float = 86400.0,
        root: str | Path | None = None,
        writer: str = "main",
        seed: int | None = None,
    ):
        self.size, self.max_age_s = int(size), float(max_age_s)
        self.root = None if root is None else Path(root)  # None: kept in memory only
        self.writer = writer
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._vectors: np.ndarray | None = None  # [size, dim], allocated at the first query
        self._records: list[dict[str, Any]] = []
        self._n = 0
        self.seen = 0  # drawn requests offered since the reservoir last restarted its count
        self.model_version: str | None = None
        self._dirty = False
        self._save_failed = False

    def __len__(self) -> int:
        return self._n

    def offer(
        self, model_version: str, query: np.ndarray, k: int, spec: dict[str, list[str]] | None, now: float | None = None
    ) -> None:
        """Algorithm R: the first `size` queries fill it, the n-th after that replaces a random one with
        probability size / n. A query of another model (or dim) empties it first."""
        with self._lock:
            if model_version != self.model_version or self._vectors is None or self._vectors.shape[1] != len(query):
                self._reset(model_version, len(query))
            assert self._vectors is not None
            self.seen += 1
            if self._n < self.size:
                slot = self._n
                self._n += 1
                self._records.append({})
            else:
                slot = int(self._rng.integers(self.seen))
                if slot >= self.size:
                    return
            self._vectors[slot] = query
            self._records[slot] = {"k": int(k), "filter": spec, "ts": int(time.time() if now is None else now)}
            self._dirty = True

    def _reset(self, model_version: str, dim: int) -> None:
        self._vectors = np.zeros((self.size, dim), np.float32)
        self._records, self._n, self.seen = [], 0, 0
        self.model_version = model_version
        self._dirty = True

    def _expire(self, now: float) -> None:
        """Drop queries older than max_age_s (under the lock); the count restarts from what is left."""
        keep = [i for i, r in enumerate(self._records) if now - r["ts"] <= self.max_age_s]
        if len(keep) == self._n or self._vectors is None:
            return
        self._vectors[: len(keep)] = self._vectors[keep]
        self._records = [self._records[i] for i in keep]
        self._n = self.seen = len(keep)
        self._dirty = True

    def contents(self, now: float | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """A copy of the kept queries (expired ones dropped first) and their records."""
        with self._lock:
            self._expire(time.time() if now is None else now)
            if self._vectors is None:
                return np.zeros((0, 0), np.float32), []
            return self._vectors[: self._n].copy(), [dict(r) for r in self._records]

    def merged(self, model_version: str) -> np.ndarray:
        """The query vectors of `model_version`: this process's and every other writer's under the root."""
        mine, _ = self.contents()
        parts = [mine] if self.model_version == model_version and len(mine) else []
        if self.root is not None:
            others = read_live_queries(self.root, model_version, self.max_age_s, skip=self.writer, strict=False)
            if len(others):
                parts.append(others.vectors)
        dims = {p.shape[1] for p in parts}
        if len(dims) > 1:
            raise TowerannError(f"live queries of dims {sorted(dims)} under {self.root}; remove the stale ones")
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def save(self, now: float | None = None) -> bool:
        """Write the reservoir under the root when it changed; a failure is logged once, never raised."""
        if self.root is None:
            return False
        with self._lock:
            self._expire(time.time() if now is None else now)
            if not self._dirty or self._vectors is None:
                return False
            vectors, records = self._vectors[: self._n].copy(), [dict(r) for r in self._records]
            meta = {"model_version": self.model_version, "seen": self.seen, "size": self.size}
            self._dirty = False
        try:
            write_live_queries(self.root, self.writer, vectors, records, meta)
        except (OSError, TowerannError) as e:
            self._dirty = True
            if not self._save_failed:
                log.warning("live queries: cannot write them under %s (%s); kept in memory", self.root, e)
            self._save_failed = True
            return False
        self._save_failed = False
        return True

    def load(self, model_version: str | None = None) -> int:
        """Read back what this writer saved (a restart keeps its reservoir), if it is of `model_version`;
        a reservoir that fails its checks is logged and left out. Returns the queries loaded."""
        if self.root is None:
            return 0
        directory = self.root / LIVE_QUERIES / self.writer
        if not directory.is_dir():
            return 0
        try:
            m, vectors, records = read_live_writer(directory)
        except TowerannError as e:
            log.warning("live queries: %s; starting with an empty reservoir", e)
            return 0
        if model_version is not None and m.get("model_version") != model_version:
            log.info(
                "live queries under %s are of model %r, not %r: not loaded",
                directory,
                m.get("model_version"),
                model_version,
            )
            return 0
        with self._lock:
            self._reset(str(m.get("model_version")), vectors.shape[1])
            n = min(len(vectors), self.size)
            assert self._vectors is not None
            self._vectors[:n] = vectors[:n]
            self._records = [dict(r) for r in records[:n]]
            self._n = n
            self.seen = max(n, int(m.get("seen", n)))
            self._expire(time.time())
            self._dirty = False
            return self._n


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
        reservoir: LiveQueries | None = None,
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
        self.reservoir = reservoir  # live queries kept for re-tuning (also set after construction)
        # more /readyz detail (serving.retune_loop: the live re-tune's state), merged into health()
        self.more_health: Callable[[], dict[str, Any]] | None = None
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
        if self.reservoir is not None:  # vector, k and filter values only: never the user
            try:
                self.reservoir.offer(bundle.model_version, query, k, filter_spec(bundle, flt))
            except Exception:  # the reservoir must never fail a request
                log.exception("live queries: keeping a query")
        if time.monotonic() < self._idle_until:
            self._dropped("busy")
            return
        try:
            self._queue.put_nowait((weakref.ref(bundle), query, k, flt, ids, bundle.version))
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
        version: str | None = None,
    ) -> float | None:
        """Exact search for one sample on the bundle that answered it; record and return its recall under
        `version` (the bundle's version when the request was answered; default: its version now)."""
        with self.guard:  # no index write or swap while the exact search reads the index
            bundle = bundle_ref()
            if bundle is None or not self.holder.ready or self.holder.current() is not bundle:
                del bundle
                self._dropped("stale")
                return None
            truth = bundle.index.exact_search(query[None, :], k, filter=flt).ids[0]
            version = version or bundle.version
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
            "live_queries": None if self.reservoir is None else len(self.reservoir),
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
        out = {"healthy": not below, "threshold": self.threshold, "samples": samples, "below": below}
        if self.more_health is not None:
            out.update(self.more_health())
        return out

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
        """Stop the worker (samples still queued are not scored) and save the reservoir."""
        if self.reservoir is not None:
            self.reservoir.save()
        if self._thread is not None:
            self._closing = True
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:  # the worker is stuck in a search; it is a daemon thread
                pass
            self._thread.join(timeout=5)
            self._thread = None

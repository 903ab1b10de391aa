"""Hot swap: notice a newly published bundle, load and validate it, replay the delta log, swap.

The new bundle is loaded, checked (model and index belong together - `RetrievalBundle.load` refuses
a mismatched pair, by the rule startup used, or a bad checksum - and its recall@100 against exact
search on sample user-tower queries reaches `min_recall`) and brought up to date with the delta log
while the old one keeps serving. Only the last catch-up and the swap itself hold the writers' lock,
so no write falls between the replay and the swap. A bundle that fails is refused and remembered
(not retried until CURRENT changes again); the old one keeps serving. After the swap the old
bundle's index memory is handed back as soon as no request holds it (release_when_unused), so two
bundles live at once only for the load, the validation and the replay.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from towerann.errors import TowerannError
from towerann.freshness.live import ItemWriter, replay
from towerann.index.snapshot import current_version
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.monitor import background_manners, lower_this_threads_priority

log = logging.getLogger(__name__)

VALIDATION_QUERIES = 64
RELOAD_NICE = 10  # the reload thread's nice value; the request threads keep 0


def validation_recall(bundle: RetrievalBundle, n: int = VALIDATION_QUERIES, k: int = 100, seed: int = 0) -> float:
    """recall@k of the bundle's index vs exact search, for user-tower queries of made-up sessions."""
    from towerann.index.tune import recall_at_k

    rng = np.random.default_rng(seed)
    n_items = len(bundle.external_ids)
    if len(bundle.index) == 0 or n_items == 0:
        return 1.0
    if not bundle.has_user_tower:  # vectors-only, no user tower: the sample of its space it was published with
        if bundle.validation_queries is None or not len(bundle.validation_queries):
            return 1.0
        q = np.asarray(bundle.validation_queries[:n], np.float32)
    else:
        queries = []
        for i in range(n):  # sessions of a few random catalog items: queries as the user tower makes them
            picks = rng.integers(0, n_items, size=min(bundle.history_len, 1 + i % 8))
            history = [(str(bundle.external_ids[p]), int(bundle.item_model_cat[p])) for p in picks]
            queries.append(bundle.encoder.encode(f"validation-{i}", {}, history))
        q = np.asarray(queries, np.float32)
    k = min(k, len(bundle.index))
    # Exact search a few queries at a time: 64 at once over 1M items would allocate ~1.5 GB of scores
    # and partition indexes beside the bundle being served.
    truth = np.concatenate([bundle.index.exact_search(q[s : s + 4], k).ids for s in range(0, len(q), 4)])
    return recall_at_k(bundle.index.search(q, k).ids, truth)


def release_when_unused(old: RetrievalBundle, wait_s: float = 5.0) -> int:
    """Free the swapped-out bundle's index memory without a long GIL hold; return the bytes released.

    Freeing a big index at once can hold the GIL for tens of milliseconds (see Index.release_memory),
    and every request queued behind it waits. So wait until no request still holds the old bundle
    nor its index (refcounts: the caller's name and our argument; the bundle's attribute), let the
    index hand its pages back with the GIL released, and let the destructor free what is by then
    almost nothing. If anything keeps them beyond `wait_s`, their memory is left to plain
    reference counting."""
    deadline = time.monotonic() + wait_s
    # The counts include getrefcount's own argument.
    while sys.getrefcount(old) > 3 or sys.getrefcount(old.index) > 2:
        if time.monotonic() > deadline:
            log.info("bundle %s is still in use after %.0fs; freed when its last user lets go", old.version, wait_s)
            return 0
        time.sleep(0.002)
    return old.index.release_memory()


class _Phases:
    """Seconds per reload phase, for the reload's answer and the log (where a swap spends its time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()
        self.started_unix = time.time()  # where the phases begin on a client's clock (bench freshness)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._last = round(now - self._last, 4), now


class Reloader:
    """Loads the bundle CURRENT names under `root` into the writer's holder when it changes.

    `model_dir`: the model for a version without a model/ directory of its own (a plain index
    snapshot from `towerann index build`, served with [paths] model), as at startup.
    `given_model`: the model given explicitly at startup (`serve --model`): every new version is
    paired with it by the rule startup used (serving.bundle.check_pairing, through RetrievalBundle.load),
    so a version it may not serve (another space id, another dim, an index from another item tower)
    is refused with that rule's one line and the old version keeps serving."""

    def __init__(
        self,
        writer: ItemWriter,
        root: str | Path,
        min_recall: float = 0.8,
        model_dir: str | Path | None = None,
        given_model: str | Path | None = None,
    ):
        self.writer, self.root, self.min_recall = writer, Path(root), float(min_recall)
        self.model_dir, self.given_model = model_dir, given_model
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._refused: str | None = None
        self._reload_lock = threading.Lock()  # one reload at a time (watcher vs admin endpoint)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] = {}

    def check(self) -> dict[str, Any] | None:
        """Reload if CURRENT names a version that is neither served nor already refused."""
        try:
            version = current_version(self.root)
        except TowerannError:
            return None
        served = self.writer.holder.current().version if self.writer.holder.ready else None
        if version in (served, self._refused):
            return None
        return self.reload(f"CURRENT names {version}")

    def reload(self, reason: str = "reload asked for") -> dict[str, Any]:
        """Load, validate, replay and swap in the bundle CURRENT names now. Never raises for a bad bundle.
        `reason`: why (the watcher: CURRENT changed; POST /v1/admin/reload), for the log line.

        The work runs in a thread of its own at nice RELOAD_NICE: on a loaded machine the validation's
        exact search and the load's copying otherwise take the core a request thread is waiting for
        (at 1M items on 2 cores, 1 swap in 10 had its p99 at 4.7x steady, in the validate phase)."""
        info: list[dict[str, Any]] = []
        error: list[BaseException] = []

        def run() -> None:
            lower_this_threads_priority(RELOAD_NICE)
            try:
                info.append(self._reload(reason))
            except BaseException as e:  # handed to the caller, as if it had run there
                error.append(e)

        worker = threading.Thread(target=run, name="towerann-reload", daemon=True)
        worker.start()
        worker.join()
        if error:
            raise error[0]
        return info[0]

    def _reload(self, reason: str) -> dict[str, Any]:
        with self._reload_lock, background_manners():
            t0 = time.perf_counter()
            version = "?"
            served = self.writer.holder.current().version if self.writer.holder.ready else None
            try:
                version = current_version(self.root)
                if version == served:
                    return {"outcome": "unchanged", "index_version": version}
                phases = _Phases()
                own_model = (self.root / version / "model").is_dir()
                new = RetrievalBundle.load(
                    self.root / version,
                    model_dir=None if own_model else self.model_dir,
                    given_model=self.given_model,
                )
                phases.mark("load")
                if new.delta_seq > self.writer.delta.last_seq():  # built from another log: replay would skip writes
                    raise TowerannError(
                        f"the bundle folds the delta log up to seq {new.delta_seq}, but "
                        f"{self.writer.delta.where} ends at {self.writer.delta.last_seq()}: it was built "
                        "from another log"
                    )
                recall = validation_recall(new)
                if recall < self.min_recall:
                    raise TowerannError(f"recall@100 vs exact search {recall:.3f} < min_recall {self.min_recall}")
                phases.mark("validate")
                seq = replay(new, self.writer.delta)  # the bulk, while the old bundle keeps serving
                phases.mark("replay")
                with self.writer.lock:
                    replay(new, self.writer.delta, seq)  # writes acknowledged meanwhile
                    old = self.writer.holder.swap(new)
                phases.mark("swap")
                if old is not None:
                    release_when_unused(old)
                del old
                phases.mark("release_old")
                gc.freeze()  # keep the new bundle out of full collections (see server.asgi.freeze_heap)
                phases.mark("freeze")
                self._refused = None
                info: dict[str, Any] = {
                    "outcome": "swapped",
                    "index_version": version,
                    "model_version": new.model_version,
                    "validation_recall": round(recall, 4),
                    "delta_seq": new.delta_seq,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "phases_s": phases.seconds,
                    "phases_start_unix": round(phases.started_unix, 4),
                }
                log.info(
                    "bundle swapped: %s -> %s (%s; model %s, recall %.3f, delta seq %d, %.2fs)",
                    served,
                    version,
                    reason,
                    new.model_version,
                    recall,
                    new.delta_seq,
                    info["seconds"],
                    extra={"event": "bundle_swapped", "from_version": served, "to_version": version, "reason": reason},
                )
            except Exception as e:  # any failure: refuse this bundle, keep serving the old one
                self._refused = version
                info = {"outcome": "refused", "index_version": version, "error": f"{type(e).__name__}: {e}"}
                why = " ".join(info["error"].split())  # one line, whatever the exception's message holds
                log.error(
                    "bundle refused: %s under %s (%s): %s; still serving %s",
                    version,
                    self.root,
                    reason,
                    why,
                    served,
                    extra={"event": "bundle_refused", "version": version, "reason": reason, "error": why},
                )
            self.last = info
            for listener in self._listeners:
                listener(info["outcome"], info)
            return info

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `listener(outcome, info)` after every reload (e.g. to count outcomes in /metrics)."""
        self._listeners.append(listener)

    def start(self, poll_s: float) -> None:
        """Watch CURRENT every `poll_s` seconds in a daemon thread (0: do not watch)."""
        if poll_s <= 0 or self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.check()
                except Exception:  # the watcher must outlive any surprise
                    log.exception("bundle watcher")

        self._thread = threading.Thread(target=run, name="towerann-bundle-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

"""The live re-tune: a served bundle whose online recall is measurably under its own tuned target re-tunes
its search settings on the live-query reservoir, checks them, applies them without a reload and publishes them.

    loop = attach(cfg, holder, monitor, guard, root, registry)   # server.server wires it; None: monitor off
    loop.settle()                                                # tests: wait until no re-tune is due or running
    loop.close()                                                 # stops the thread, saves the reservoir

What it judges: the recall monitor's samples of *unfiltered* requests (filter kind "none") answered by the
served version. Over the last N of them ([retune] samples), the mean recall@k vs exact search and its upper
confidence bound, mean + z * sd / sqrt(N) with z the one-sided normal quantile of [retune] confidence. When
the bound is under the bundle's own tuned target (its manifest's tuning.target), the recall is measurably
below what the bundle promised and a re-tune starts. Filtered requests are left out of the judgement: their
recall depends on the filter plan as much as on the setting.

What a re-tune does, on one background thread at nice 19 with faiss and BLAS on one thread and the GIL
handed back every 0.5 ms while it runs (monitor.background_manners: it takes at most one core, and the
request threads come first): it loads the served version again from its
directory (a second copy of the index while it runs, as a reload holds two; ivfpq's vectors stay mapped
from the file); splits the reservoir (every writer's under the root, of the served model; each query used
unfiltered, its filter ignored) into a tuning part and a held-out part ([retune] holdout); tunes to
target + margin at the tuning's k on the tuning part (index.tune); and checks on the held-out part that the
new setting reaches the target (recall@k vs exact search) and that the p99 of one search at it is within
[retune] max_p99_ms. A setting that passes is published (index.snapshot.republish: the same files as hard
links, a manifest with `retuned_from` and `retune_reason`, e.g. "online recall 0.821 < 0.95 over 500
samples"; its tuning record keeps the bundle's own target, with target + margin as `tuned_to`), then set
as the served index's search defaults under the writers' lock, and the served bundle renamed to the new
version (BundleHolder.relabel): no reload, and the CURRENT watcher finds it served.
`towerann index rollback` undoes it like any version. The filter plan stays as it was measured.

A setting that misses the target (refused_recall), or the latency budget (refused_latency), or a re-tune
that fails (failed) leaves the old settings; each outcome is counted (towerann_retunes_total{outcome}) and
logged as one state-change line (event retune_applied, retune_refused, retune_failed). After a refusal
nothing restores the target: that is said once per version (event recall_unrestorable; the gauge
towerann_recall_unrestorable is 1; /readyz recall.retune.state "unrestorable"), and with [freshness]
rebuild_on_drift the server's rebuild (`rebuild`, given by server.server when it can rebuild the bundle)
runs once for that version. One re-tune at a time; after one, N fresh samples are needed before judging
again, and after a refused or failed one also [retune] cooldown_s.

Several worker processes: each keeps its own reservoir (its own directory under the root; readers merge
them); only the judging one (`judge`: the single process, or worker 0) re-tunes, and the others pick the
new version up from CURRENT like any other.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towerann.config import Config, RetuneConfig
from towerann.index.base import without_room
from towerann.index.recall import recall_at_k
from towerann.index.snapshot import load_snapshot, republish
from towerann.index.tune import tune
from towerann.serving.holder import BundleHolder
from towerann.serving.monitor import LiveQueries, RecallMonitor, background_manners, lower_this_threads_priority

__all__ = ["OUTCOMES", "RetuneLoop", "attach", "upper_bound"]

log = logging.getLogger(__name__)

OUTCOMES = ("applied", "refused_recall", "refused_latency", "failed")
UNTUNABLE = ("exact", "sharded")  # no search settings here to tune (a sharded index: rebuild it)
P99_SEARCHES = 200  # one-query searches timed at the new setting for its p99
RETUNE_NICE = 19


def upper_bound(values: Any, confidence: float) -> tuple[float, float]:
    """(mean, one-sided upper confidence bound of the mean) of per-sample recalls (normal approximation)."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return mean, mean + statistics.NormalDist().inv_cdf(confidence) * sd / math.sqrt(len(v))


@dataclass(frozen=True)
class _Trigger:
    version: str
    mean: float
    target: float
    samples: int

    @property
    def reason(self) -> str:
        return f"online recall {self.mean:.3f} < {self.target:g} over {self.samples} samples"


@contextmanager
def _quiet_tuner() -> Iterator[None]:
    """index.tune logs every setting it measures at INFO: in a server, only the outcome is a state change."""
    tuner = logging.getLogger("towerann.index.tune")
    before = tuner.level
    tuner.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tuner.setLevel(before)


class RetuneLoop:
    """The judge (monitor listener) and the one thread that re-tunes and saves the reservoir."""

    def __init__(
        self,
        holder: BundleHolder,
        monitor: RecallMonitor,
        reservoir: LiveQueries | None,
        settings: RetuneConfig,
        guard: AbstractContextManager[Any],
        root: Path | None,
        judge: bool = True,
        save_every_s: float = 0.0,
        rebuild: Callable[[str], None] | None = None,
        seed: int = 0,
    ):
        self.holder, self.monitor, self.reservoir = holder, monitor, reservoir
        self.settings, self.guard, self.root = settings, guard, root
        self.rebuild, self.save_every_s, self._seed = rebuild, float(save_every_s), seed
        self.off = self._why_off(judge)  # None: judging
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.last: dict[str, Any] | None = None  # the last re-tune's outcome and measurements
        self.unrestorable: dict[str, Any] | None = None  # {version, reason} while no re-tune restores the target
        self._rebuilt_for: str | None = None
        self._samples: deque[float] = deque(maxlen=settings.samples)
        self._version: str | None = None
        self._pending: _Trigger | None = None
        self._busy = False
        self._not_before = 0.0  # time.monotonic() before which no re-tune starts (cooldown)
        self._lock = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retunes: Any = None  # prometheus_client metrics, once exported
        self._unrestorable_gauge: Any = None
        self._live_gauge: Any = None
        monitor.listen(self._on_sample, lambda reason: None, lambda version, kind: None)
        monitor.more_health = self.health
        holder.subscribe(self._on_bundle)

    def _why_off(self, judge: bool) -> str | None:
        if not self.settings.enabled:
            return "[retune] enabled = false"
        if self.reservoir is None:
            return "no live-query reservoir ([monitor] reservoir = 0)"
        if self.root is None:
            return "the server serves one bundle directory, not a snapshot root: nowhere to publish"
        if not judge:
            return "another worker process re-tunes"
        return None

    # ---- metrics ------------------------------------------------------------------------------------

    def export(self, registry: Any) -> None:
        """Register the loop's metrics in a prometheus_client registry (the app's: serving.app.Metrics)."""
        from prometheus_client import Counter, Gauge

        self._retunes = Counter(
            "towerann_retunes",
            "live re-tunes by outcome (applied; refused_recall, refused_latency: the old settings stay; failed)",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self._retunes.labels(outcome=outcome)
        self._unrestorable_gauge = Gauge(
            "towerann_recall_unrestorable",
            "1 while the served bundle's online recall is measurably under its tuned target and no re-tune restores it",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._live_gauge = Gauge(
            "towerann_live_queries",
            "live query vectors kept for re-tuning (the reservoir, [monitor] reservoir)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._unrestorable_gauge.set(1 if self.unrestorable else 0)
        self._live_gauge.set(len(self.reservoir) if self.reservoir is not None else 0)

    # ---- judging (the monitor's thread) -------------------------------------------------------------

    def _target(self, version: str) -> tuple[float, int] | None:
        """(tuned target, its k) of the served bundle if it is `version` and has settings to tune."""
        if not self.holder.ready:
            return None
        b = self.holder.current()
        if b.version != version or b.index.kind in UNTUNABLE:
            return None
        tuned = b.index.tuning or {}
        target, k = tuned.get("target"), tuned.get("k")
        if not isinstance(target, (int, float)) or not isinstance(k, int) or not 0 < target <= 1:
            return None
        return float(target), k

    def _on_sample(self, version: str, kind: str, recall: float, mean: float) -> None:
        if self._live_gauge is not None and self.reservoir is not None:
            self._live_gauge.set(len(self.reservoir))
        if kind != "none" or self.off is not None:
            return
        with self._lock:
            if version != self._version:  # another version served: its samples start afresh
                self._samples.clear()
                self._version = version
            if self._busy or self._pending is not None:
                return  # answered at the setting being replaced: not evidence about the next one
            self._samples.append(recall)
            if len(self._samples) < self.settings.samples or time.monotonic() < self._not_before:
                return
            goal = self._target(version)
            if goal is None:
                return
            mean_, bound = upper_bound(self._samples, self.settings.confidence)
            if bound >= goal[0]:
                return
            self._pending = _Trigger(version, mean_, goal[0], len(self._samples))
            self._samples.clear()  # N fresh samples before the next judgement
        self._wake.set()

    def _on_bundle(self, bundle: Any) -> None:
        """After a swap or a relabel: a state about another version no longer holds."""
        if self.unrestorable is not None and self.unrestorable["version"] != bundle.version:
            self.unrestorable = None
            if self._unrestorable_gauge is not None:
                self._unrestorable_gauge.set(0)

    # ---- the thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="towerann-retune", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        lower_this_threads_priority(RETUNE_NICE)
        every = self.save_every_s
        next_save = time.monotonic() + every
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_save - time.monotonic()) if every > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                trigger = self._pending
                if trigger is not None:
                    self._busy = True
            if trigger is not None:
                try:
                    self._retune(trigger)
                finally:
                    with self._lock:
                        self._busy, self._pending = False, None
                        self._lock.notify_all()
            if every > 0 and time.monotonic() >= next_save:
                if self.reservoir is not None:
                    self.reservoir.save()
                next_save = time.monotonic() + every

    def settle(self, timeout_s: float = 120.0) -> bool:
        """Wait until no re-tune is due or running (tests); False if that took over timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        """Stop the thread (a re-tune under way is given 10 s, then left: it publishes atomically or not
        at all) and save the reservoir."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.reservoir is not None:
            self.reservoir.save()

    # ---- one re-tune --------------------------------------------------------------------------------

    def _retune(self, trigger: _Trigger) -> None:
        t0 = time.perf_counter()
        log.info(
            "re-tune started: bundle %s (%s)",
            trigger.version,
            trigger.reason,
            extra={"event": "retune_started", "version": trigger.version, "reason": trigger.reason},
        )
        try:
            info = self._measure_and_apply(trigger)
        except Exception as e:  # anything: the old settings stay, the server serves on
            info = {"outcome": "failed", "error": " ".join(f"{type(e).__name__}: {e}".split())[:500]}
            log.debug("re-tune failed", exc_info=True)
        info.update(version=trigger.version, reason=trigger.reason, seconds=round(time.perf_counter() - t0, 2))
        self.last = info
        outcome = info["outcome"]
        if outcome == "skipped":
            log.info(
                "re-tune skipped: bundle %s (%s): %s",
                trigger.version,
                trigger.reason,
                info["why"],
                extra={"event": "retune_skipped", "version": trigger.version, "reason": trigger.reason},
            )
            return
        self.counts[outcome] += 1
        if self._retunes is not None:
            self._retunes.labels(outcome=outcome).inc()
        if outcome == "applied":
            self._applied(info)
            return
        with self._lock:
            self._not_before = time.monotonic() + self.settings.cooldown_s
        if outcome == "failed":
            log.error(
                "re-tune failed: bundle %s (%s): %s; the old settings stay",
                trigger.version,
                trigger.reason,
                info["error"],
                extra={"event": "retune_failed", "version": trigger.version, "reason": trigger.reason},
            )
            return
        log.warning(
            "re-tune refused: bundle %s (%s): %s; the old settings stay",
            trigger.version,
            trigger.reason,
            info["why"],
            extra={"event": "retune_refused", "outcome": outcome, "version": trigger.version, "reason": trigger.reason},
        )
        self._cannot_restore(trigger, info)

    def _applied(self, info: dict[str, Any]) -> None:
        if self.unrestorable is not None:
            self.unrestorable = None
            if self._unrestorable_gauge is not None:
                self._unrestorable_gauge.set(0)
        log.info(
            "re-tune applied: %s -> %s (%s; %s, held-out recall@%d %.3f >= %g, p99 %.3f ms <= %g ms, %d live "
            "queries, %.1fs)",
            info["version"],
            info["to_version"],
            info["reason"],
            info["params"],
            info["k"],
            info["heldout_recall"],
            info["target"],
            info["p99_ms"],
            self.settings.max_p99_ms,
            info["queries"],
            info["seconds"],
            extra={
                "event": "retune_applied",
                "from_version": info["version"],
                "to_version": info["to_version"],
                "reason": info["reason"],
            },
        )

    def _cannot_restore(self, trigger: _Trigger, info: dict[str, Any]) -> None:
        """No setting restores the target: say so once for this version; rebuild once if configured."""
        if self.unrestorable is None or self.unrestorable["version"] != trigger.version:
            self.unrestorable = {"version": trigger.version, "reason": trigger.reason, "why": info["why"]}
            if self._unrestorable_gauge is not None:
                self._unrestorable_gauge.set(1)
            then = (
                "rebuilding it ([freshness] rebuild_on_drift)"
                if self.rebuild is not None
                else "rebuild it (`towerann refresh`, or `towerann index build` with a denser graph or more lists)"
            )
            log.warning(
                "recall target unrestorable: bundle %s (%s): no search setting reaches recall %g within p99 %g ms; %s",
                trigger.version,
                trigger.reason,
                trigger.target,
                self.settings.max_p99_ms,
                then,
                extra={"event": "recall_unrestorable", "version": trigger.version, "reason": trigger.reason},
            )
        if self.rebuild is not None and self._rebuilt_for != trigger.version:
            self._rebuilt_for = trigger.version
            try:
                self.rebuild(trigger.reason)
            except Exception as e:
                log.error(
                    "rebuild on drift failed: bundle %s: %s",
                    trigger.version,
                    " ".join(f"{type(e).__name__}: {e}".split())[:500],
                    extra={"event": "rebuild_failed", "version": trigger.version},
                )

    def _measure_and_apply(self, trigger: _Trigger) -> dict[str, Any]:
        s = self.settings
        b = self.holder.current()
        goal = self._target(trigger.version)
        if goal is None or self.reservoir is None or self.root is None:
            return {"outcome": "skipped", "why": "the bundle judged is no longer served, or has no target"}
        target, k = goal
        queries = self.reservoir.merged(b.model_version)
        if len(queries) < s.min_queries:
            return {
                "outcome": "skipped",
                "why": f"{len(queries)} live queries kept, a re-tune needs {s.min_queries} ([retune] min_queries)",
            }
        rng = np.random.default_rng(self._seed)
        order = rng.permutation(len(queries))
        n_hold = max(1, round(s.holdout * len(queries)))
        held, tuning_part = queries[order[:n_hold]], queries[order[n_hold:]]
        source = b.path
        with background_manners(), _quiet_tuner(), without_room():
            copy = load_snapshot(source, verify=False)  # its own copy: no lock against live item writes
            for key in (copy.tuning or {}).get("params", {}):
                copy.search_defaults.pop(key, None)  # the old tuned setting goes; explicit settings stay
            result = tune(copy, tuning_part, k, min(1.0, target + s.margin))
            # the margin is the tuner's headroom, not a new promise: the bundle keeps its target (recorded
            # as tune's, every applied re-tune would raise it by the margin, up to an unreachable 1.0)
            copy.tuning = {**result, "target": target, "tuned_to": result.get("target")}
            truth = copy.exact_search(held, k).ids
            heldout = recall_at_k(copy.search(held, k).ids, truth)
            p99 = _p99_ms(copy, held, k)
        info: dict[str, Any] = {
            "target": target,
            "k": k,
            "params": result.get("params"),
            "tuning_recall": result.get("recall"),
            "heldout_recall": round(heldout, 4),
            "p99_ms": round(p99, 4),
            "queries": len(queries),
            "heldout": n_hold,
        }
        if not result.get("params"):
            return {**info, "outcome": "refused_recall", "why": "tuning found no setting of the library to apply"}
        if heldout < target:
            why = f"held-out recall@{k} {heldout:.3f} < target {target:g} at the best setting {result['params']}"
            return {**info, "outcome": "refused_recall", "why": why}
        if p99 > s.max_p99_ms:
            why = f"p99 {p99:.3f} ms at {result['params']} over the budget {s.max_p99_ms:g} ms ([retune] max_p99_ms)"
            return {**info, "outcome": "refused_latency", "why": why}
        if self.holder.current() is not b:
            return {"outcome": "skipped", "why": "another bundle was swapped in meanwhile"}
        defaults = dict(copy.search_defaults)
        manifest = dict(copy.manifest or {})
        manifest.update(
            search_defaults=defaults,
            tuning=copy.tuning,
            retuned_from=source.name,
            retune_reason=trigger.reason,
        )
        path = republish(self.root, source, manifest, keep=s.keep)
        with self.guard:  # serialised with item writes and swaps
            if self.holder.current() is b:
                b.index.search_defaults = defaults
                b.index.tuning = copy.tuning
        # CURRENT names the new version already: renamed, the bundle is what the watcher expects served.
        # (Were it reloaded in between, the version served is the new one all the same.)
        self.holder.relabel(b, path, manifest)
        return {**info, "outcome": "applied", "to_version": path.name}

    # ---- reports ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The live re-tune's state for /readyz (inside the recall monitor's detail)."""
        version = self.holder.current().version if self.holder.ready else None
        goal = self._target(version) if version is not None else None
        with self._lock:
            busy, pending, judged = self._busy, self._pending is not None, len(self._samples)
        if self.off is not None:
            state, why = "off", self.off
        elif busy or pending:
            state, why = "retuning", None
        elif self.unrestorable is not None and self.unrestorable["version"] == version:
            state, why = "unrestorable", self.unrestorable["why"]
        elif goal is None:
            state, why = "idle", "the served index has no tuned target or no search settings to tune"
        else:
            state, why = "watching", None
        out: dict[str, Any] = {
            "state": state,
            "target": None if goal is None else goal[0],
            "samples": judged,
            "window": self.settings.samples,
            "outcomes": dict(self.counts),
        }
        if why:
            out["why"] = why
        if self.last is not None:
            out["last"] = {key: value for key, value in self.last.items() if key != "curve"}
        return {"retune": out, "live_queries": None if self.reservoir is None else len(self.reservoir)}


def _p99_ms(index: Any, queries: np.ndarray, k: int, n: int = P99_SEARCHES) -> float:
    """p99 milliseconds of one-query searches at the index's search defaults (the serving path), cycling
    through `queries`, after a warm-up."""
    for row in queries[:3]:
        index.search(row[None, :], k)
    times = np.empty(n)
    for i in range(n):
        row = queries[i % len(queries)]
        t0 = time.perf_counter()
        index.search(row[None, :], k)
        times[i] = time.perf_counter() - t0
    return float(np.percentile(times, 99) * 1e3)


def attach(
    cfg: Config,
    holder: BundleHolder,
    monitor: RecallMonitor | None,
    guard: AbstractContextManager[Any],
    root: Path | None,
    registry: Any = None,
    rebuild: Callable[[str], None] | None = None,
    writer: str = "main",
    judge: bool = True,
) -> RetuneLoop | None:
    """Give `monitor` its reservoir of live queries ([monitor] reservoir; read back from what `writer`
    saved under `root`, the snapshot root served, or None: kept in memory only) and start the live
    re-tune ([retune]); `registry`: where its metrics go. None when the monitor is off ([monitor] sample 0)."""
    if monitor is None:
        return None
    m = cfg.monitor
    reservoir = None
    if m.reservoir > 0:
        reservoir = LiveQueries(m.reservoir, m.reservoir_max_age_s, root, writer)
        loaded = reservoir.load(holder.current().model_version if holder.ready else None)
        if loaded:
            log.info("live queries: %d read back from %s", loaded, root)
        monitor.reservoir = reservoir
    loop = RetuneLoop(
        holder,
        monitor,
        reservoir,
        cfg.retune,
        guard,
        root,
        judge=judge,
        save_every_s=m.reservoir_save_s,
        rebuild=rebuild,
    )
    if registry is not None:
        loop.export(registry)
    loop.start()
    return loop

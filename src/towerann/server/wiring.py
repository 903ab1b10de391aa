"""Config -> the parts of one serving process, wired; the HTTP server (server.py) runs them.

Nothing here imports a web framework: `towerann refresh` and the tests use the same wiring."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from towerann.config import Config
from towerann.errors import ArtifactError, TowerannError
from towerann.features import FeatureStore, open_configured_store
from towerann.freshness.deltalog import DurabilityWatch, RedisDeltaLog, check_durable, open_configured_delta_log
from towerann.freshness.live import ItemWriter, replay
from towerann.freshness.log_binding import bind_delta_log
from towerann.freshness.reload import Reloader
from towerann.index.base import room_on_load
from towerann.index.scann import load_in_helper_process
from towerann.index.snapshot import CURRENT, resolve
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.monitor import RecallMonitor
from towerann.serving.retriever import Retriever
from towerann.storeurl import redact

log = logging.getLogger(__name__)


def load_bundle(cfg: Config, model_dir: str | None = None) -> RetrievalBundle:
    """The configured bundle; whatever goes wrong reading it (a corrupted file that the libraries below
    fail on in their own ways) is an ArtifactError: one line, exit code 2, no traceback.

    `model_dir`: the model given explicitly (`serve --model`), paired with the bundle by
    serving.bundle.check_pairing, as every reload is (a vectors-only bundle of its declared space gets
    its user tower); [paths] model serves only a plain snapshot, when no model is given."""
    try:
        own = (resolve(cfg.paths.index) / "model").is_dir()
        return RetrievalBundle.load(cfg.paths.index, model_dir=None if own else cfg.paths.model, given_model=model_dir)
    except TowerannError:
        raise
    except Exception as e:
        detail = " ".join(str(e).split())[:300]
        raise ArtifactError(
            f"{cfg.paths.index}: cannot load the bundle ({type(e).__name__}: {detail}); "
            "republish it, or point --index ([paths] index) at a good one"
        ) from e


def open_retriever(
    cfg: Config, store: FeatureStore | None = None, model_dir: str | None = None, bundle: RetrievalBundle | None = None
) -> Retriever:
    """Load the configured bundle (unless given: loaded by the parent of the workers) and open the
    configured store.

    A bundle carries its own model; [paths] model is used only for a plain index snapshot."""
    if bundle is None:
        bundle = load_bundle(cfg, model_dir)
    f, s, m = cfg.features, cfg.serve, cfg.monitor
    holder = BundleHolder(bundle)
    monitor = RecallMonitor(holder, m.sample, m.threshold, m.queue, max_busy=m.max_busy) if m.sample > 0 else None
    return Retriever(
        holder,
        store or open_configured_store(f),
        max_k=s.max_k,
        max_id_length=s.max_id_length,
        max_clock_skew_s=s.max_clock_skew_s,
        features_timeout_s=f.timeout_ms / 1e3,
        write_timeout_s=f.write_timeout_ms / 1e3,
        monitor=monitor,
    )


@dataclass
class Service:
    """One serving process: the request path, item writes, the CURRENT watcher, store upkeep."""

    cfg: Config
    retriever: Retriever
    writer: ItemWriter
    reloader: Reloader | None  # None when the index path has no CURRENT to watch
    token: str | None
    owns_store: bool = True
    durability: DurabilityWatch | None = None  # a Redis delta log that must keep logging its writes
    _stop: threading.Event = field(default_factory=threading.Event)
    _upkeep: threading.Thread | None = None
    _watch: threading.Thread | None = None

    def start(self) -> None:
        """Start the background work: the CURRENT watcher, the purge of expired sessions, and (a
        Redis delta log) the durability check every [freshness] poll_s."""
        if self.reloader is not None:
            self.reloader.start(self.cfg.freshness.poll_s)
        every = self.cfg.features.purge_every_s
        if every > 0 and self._upkeep is None:
            self._upkeep = threading.Thread(target=self._purge_loop, args=(every,), name="towerann-purge", daemon=True)
            self._upkeep.start()
        poll = self.cfg.freshness.poll_s
        if self.durability is not None and poll > 0 and self._watch is None:
            self._watch = threading.Thread(
                target=self._durability_loop, args=(poll,), name="towerann-durability", daemon=True
            )
            self._watch.start()

    def _durability_loop(self, every: float) -> None:
        assert self.durability is not None
        while not self._stop.wait(every):
            try:
                self.durability.check()
            except Exception:  # the loop must outlive a hiccup; the next round tries again
                log.exception("checking the delta log's durability")

    def _purge_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                n = self.retriever.store.purge_expired()
                if n:
                    log.info("purged the expired sessions of %d users", n)
            except Exception:  # the loop must outlive a store hiccup; the next round tries again
                log.exception("purging expired sessions")

    def close(self) -> None:
        self._stop.set()
        for thread in (self._upkeep, self._watch):
            if thread is not None:
                thread.join(timeout=10)
        if self.reloader is not None:
            self.reloader.stop()
        self.writer.delta.close()
        if self.owns_store:
            self.retriever.close()
            self.retriever.store.close()


def open_service(
    cfg: Config,
    retriever: Retriever | None = None,
    model_dir: str | None = None,
    shared: bool = False,
    bundle: RetrievalBundle | None = None,
) -> Service:
    """Open the store and the delta log, load the bundle, replay the log onto it (a restart loses no
    acknowledged write) and set up the CURRENT watcher. The log lives in Redis when the store does.

    `shared`: one of several worker processes on one log (freshness.live.ItemWriter)."""
    load_in_helper_process()  # ScaNN's loader holds the GIL: a swap must not stall the requests
    room_on_load()  # a loaded index's vectors get room for live adds off the request path, not at the first add
    owns_store = retriever is None
    retriever = retriever or open_retriever(cfg, model_dir=model_dir, bundle=bundle)
    try:
        delta = open_configured_delta_log(cfg)
    except BaseException:
        if owns_store:
            retriever.close()
            retriever.store.close()
        raise
    try:
        durability = check_durable(delta, cfg.freshness.allow_volatile)  # a Redis delta log must survive Redis
        log.info("delta log: %s (%s)", redact(getattr(delta, "url", "") or str(getattr(delta, "path", ""))), durability)
        if retriever.holder.ready and (Path(cfg.paths.index) / CURRENT).is_file():  # a root: its own log
            bind_delta_log(cfg.paths.index, delta, retriever.holder.current().delta_seq, adopt=cfg.freshness.adopt_log)
        writer = ItemWriter(retriever.holder, delta, shared=shared)
        if retriever.monitor is not None:  # its exact searches must not overlap an index write or a swap
            retriever.monitor.guard = writer.lock
        if retriever.holder.ready:
            replay(retriever.holder.current(), writer.delta)
    except BaseException:
        delta.close()
        if owns_store:
            retriever.close()
            retriever.store.close()
        raise
    root = Path(cfg.paths.index)
    reloader = (
        Reloader(
            writer,
            root,
            cfg.freshness.min_recall,
            model_dir=model_dir or cfg.paths.model or None,
            given_model=model_dir,
        )
        if (root / CURRENT).is_file()
        else None
    )
    watch = None
    if isinstance(delta, RedisDeltaLog) and not cfg.freshness.allow_volatile:  # checked once above; again while serving
        links = [delta.link, *([retriever.store.link] if hasattr(retriever.store, "link") else [])]
        watch = DurabilityWatch(delta, links)
    return Service(cfg, retriever, writer, reloader, cfg.api_token(), owns_store, durability=watch)

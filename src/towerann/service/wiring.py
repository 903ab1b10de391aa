"""Config -> the parts of one serving process, wired; the HTTP server (server.py) runs them.

Nothing here imports a web framework: `towerann refresh` and the tests use the same wiring."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from towerann.config import Config
from towerann.features import FeatureStore, open_configured_store
from towerann.freshness.deltalog import open_configured_delta_log
from towerann.freshness.live import ItemWriter, replay
from towerann.freshness.reload import Reloader
from towerann.index.snapshot import CURRENT, resolve
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.retriever import Retriever

log = logging.getLogger(__name__)


def open_retriever(cfg: Config, store: FeatureStore | None = None, model_dir: str | None = None) -> Retriever:
    """Load the configured bundle and open the configured store.

    A bundle carries its own model; [paths] model is used only for a plain index snapshot."""
    if model_dir is None and not (resolve(cfg.paths.index) / "model").is_dir():
        model_dir = cfg.paths.model
    bundle = RetrievalBundle.load(cfg.paths.index, model_dir=model_dir)
    return Retriever(BundleHolder(bundle), store or open_configured_store(cfg.features), max_k=cfg.serve.max_k)


@dataclass
class Service:
    """One serving process: the request path, item writes, the CURRENT watcher, store upkeep."""

    cfg: Config
    retriever: Retriever
    writer: ItemWriter
    reloader: Reloader | None  # None when the index path has no CURRENT to watch
    token: str | None
    owns_store: bool = True
    _stop: threading.Event = field(default_factory=threading.Event)
    _upkeep: threading.Thread | None = None

    def start(self) -> None:
        """Start the background work: the CURRENT watcher and the purge of expired sessions."""
        if self.reloader is not None:
            self.reloader.start(self.cfg.freshness.poll_s)
        every = self.cfg.features.purge_every_s
        if every > 0 and self._upkeep is None:
            self._upkeep = threading.Thread(target=self._purge_loop, args=(every,), name="towerann-purge",
                                            daemon=True)
            self._upkeep.start()

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
        if self._upkeep is not None:
            self._upkeep.join(timeout=10)
        if self.reloader is not None:
            self.reloader.stop()
        self.writer.delta.close()
        if self.owns_store:
            self.retriever.store.close()


def open_service(cfg: Config, retriever: Retriever | None = None, model_dir: str | None = None) -> Service:
    """Open the store and the delta log, load the bundle, replay the log onto it (a restart loses no
    acknowledged write) and set up the CURRENT watcher. The log lives in Redis when the store does."""
    owns_store = retriever is None
    retriever = retriever or open_retriever(cfg, model_dir=model_dir)
    writer = ItemWriter(retriever.holder, open_configured_delta_log(cfg))
    if retriever.holder.ready:
        replay(retriever.holder.current(), writer.delta)
    root = Path(cfg.paths.index)
    reloader = Reloader(writer, root, cfg.freshness.min_recall) if (root / CURRENT).is_file() else None
    return Service(cfg, retriever, writer, reloader, cfg.api_token(), owns_store)

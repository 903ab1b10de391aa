"""Run the HTTP app: in the foreground (`towerann serve`), in a background thread (demo, tests) or
in a subprocess (benchmarks, where the load generator must not share the server's GIL)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from towerann.config import Config
from towerann.errors import BackendUnavailable
from towerann.features import FeatureStore, open_store
from towerann.serving.app import create_app
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.retriever import Retriever

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_configured_store(cfg: Config) -> FeatureStore:
    f = cfg.features
    path = f.path if f.store == "embedded" else None
    return open_store(f.store, path=path, max_events=f.max_events, ttl_s=f.ttl_s)


def open_configured_delta_log(cfg: Config) -> Any:
    """The delta log of item writes: a stream in the feature store's Redis, else SQLite at
    [freshness] delta_path (default: delta.sqlite beside [paths] index)."""
    from towerann.freshness.deltalog import open_delta_log

    store = cfg.features.store
    if store.startswith(("redis://", "rediss://", "unix://")):
        return open_delta_log(store)
    return open_delta_log("embedded", cfg.freshness.delta_path or Path(cfg.paths.index).parent / "delta.sqlite")


def build_retriever(cfg: Config, store: FeatureStore | None = None, model_dir: str | None = None) -> Retriever:
    """Load the configured bundle and open the configured store.

    A bundle carries its own model; [paths] model is used only for a plain index snapshot."""
    from towerann.index.snapshot import resolve

    if model_dir is None and not (resolve(cfg.paths.index) / "model").is_dir():
        model_dir = cfg.paths.model
    bundle = RetrievalBundle.load(cfg.paths.index, model_dir=model_dir)
    return Retriever(BundleHolder(bundle), store or open_configured_store(cfg), max_k=cfg.serve.max_k)


@dataclass
class Freshness:
    """Item writes and hot swaps for one server: the delta log, the writer, the CURRENT watcher."""

    writer: Any  # freshness.live.ItemWriter, or None when no delta log is configured
    reloader: Any  # freshness.reload.Reloader, or None when the index path has no CURRENT to watch
    token: str | None

    def start(self, poll_s: float) -> None:
        if self.reloader is not None:
            self.reloader.start(poll_s)

    def close(self) -> None:
        if self.reloader is not None:
            self.reloader.stop()
        if self.writer is not None:
            self.writer.delta.close()


def open_freshness(cfg: Config, retriever: Retriever) -> Freshness:
    """Open the delta log, replay it onto the loaded bundle (a restart loses no acknowledged write),
    and set up the CURRENT watcher. The log lives in Redis when the feature store does."""
    from towerann.freshness.live import ItemWriter, replay
    from towerann.freshness.reload import Reloader

    writer = ItemWriter(retriever.holder, open_configured_delta_log(cfg))
    if retriever.holder.ready:
        replay(retriever.holder.current(), writer.delta)
    root = Path(cfg.paths.index)
    reloader = Reloader(writer, root, cfg.freshness.min_recall) if (root / "CURRENT").is_file() else None
    return Freshness(writer, reloader, cfg.api_token())


def freeze_heap() -> None:
    """Exempt everything loaded so far (the bundle: models, id maps) from the cyclic GC.

    Without it, each full collection walks the million-entry id map and the model's objects and
    stalls the event loop for 100-170 ms (measured at 1M items), which is the p99 at 200 req/s.
    Call it again after a bundle swap, so the new bundle is exempt too."""
    import gc

    gc.collect()
    gc.freeze()


def _uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    # access_log off: one INFO line per request costs more than the retrieval itself
    return uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="off")


def serve_forever(cfg: Config, model_dir: str | None = None) -> None:
    retriever = build_retriever(cfg, model_dir=model_dir)
    fresh = open_freshness(cfg, retriever)
    try:
        app = create_app(retriever, cfg.serve.max_body_bytes, fresh.writer, fresh.reloader, fresh.token)
        freeze_heap()
        fresh.start(cfg.freshness.poll_s)
        log.warning("serving %s on http://%s:%d", retriever.holder.current().describe(), cfg.serve.host, cfg.serve.port)
        uvicorn.Server(_uvicorn_config(app, cfg.serve.host, cfg.serve.port)).run()
    finally:
        fresh.close()
        retriever.store.close()


@dataclass
class ServerHandle:
    url: str
    retriever: Retriever | None
    _stop: Any
    freshness: Freshness | None = None
    process: subprocess.Popen | None = None  # start_subprocess only

    def stop(self) -> None:
        self._stop()


def start_background(cfg: Config, retriever: Retriever | None = None, timeout_s: float = 30.0) -> ServerHandle:
    """Serve in a daemon thread on a free loopback port (cfg.serve.port is ignored); `.stop()` ends it
    and closes the store it opened."""
    own = retriever is None
    retriever = retriever or build_retriever(cfg)
    fresh = open_freshness(cfg, retriever)
    app = create_app(retriever, cfg.serve.max_body_bytes, fresh.writer, fresh.reloader, fresh.token)
    freeze_heap()
    fresh.start(cfg.freshness.poll_s)
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; without it, Nagle plus
    # delayed ACKs add 40 ms to every response (uvicorn writes headers and body separately).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.serve.host, 0))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(_uvicorn_config(app, host, port))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="towerann-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise BackendUnavailable(f"HTTP server on {host}:{port} did not start within {timeout_s:.0f}s")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        fresh.close()
        if own:
            retriever.store.close()

    return ServerHandle(f"http://{host}:{port}", retriever, stop, fresh)


def start_subprocess(index: str | Path, store: str, store_path: str | None = None, max_k: int = 1000,
                     timeout_s: float = 120.0, config: str | Path | None = None,
                     env: dict[str, str] | None = None) -> ServerHandle:
    """`towerann serve` in a child process on a free port; waits for /readyz (`handle.process` is the child)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "towerann.serving.commands", "serve", "--index", str(index), "--store", store,
           "--port", str(port), "--max-k", str(max_k)]
    if store_path:
        cmd += ["--store-path", store_path]
    if config:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BackendUnavailable(f"`{' '.join(cmd)}` exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise BackendUnavailable(f"server at {url} not ready within {timeout_s:.0f}s")
        time.sleep(0.1)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    return ServerHandle(url, None, stop, process=proc)

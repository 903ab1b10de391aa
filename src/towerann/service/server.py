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
from typing import Any, Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from towerann.config import Config
from towerann.errors import BackendUnavailable
from towerann.serving.app import create_app
from towerann.serving.retriever import Retriever
from towerann.service.wiring import Service, open_service
from towerann.service.workers import listening_socket

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_for(svc: Service, worker: str | None = None, metrics_dir: str | None = None,
            freshen: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    return create_app(svc.retriever, svc.cfg.serve.max_body_bytes, svc.writer, svc.reloader, svc.token,
                      max_items_per_write=svc.cfg.serve.max_items_per_write, worker=worker,
                      metrics_dir=metrics_dir, freshen=freshen)


def close_app(app: FastAPI | None) -> None:
    pool = getattr(getattr(app, "state", None), "write_pool", None)
    if pool is not None:
        pool.shutdown(wait=False)


def freeze_heap() -> None:
    """Exempt everything loaded so far (the bundle: models, id maps) from the cyclic GC.

    Without it, each full collection walks the million-entry id map and the model's objects and
    stalls the event loop for 100-170 ms (measured at 1M items), which is the p99 at 200 req/s.
    The reloader freezes again after a bundle swap, so the new bundle is exempt too."""
    import gc

    gc.collect()
    gc.freeze()


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    # access_log off: one INFO line per request costs more than the retrieval itself
    return uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="off")


def serve_forever(cfg: Config, model_dir: str | None = None) -> None:
    """`towerann serve`: one process, or [serve] workers processes on one port (service.workers)."""
    from towerann.service.workers import resolve_workers, run_workers

    n = resolve_workers(cfg)
    if n > 1:
        run_workers(cfg, n, model_dir)
        return
    svc = open_service(cfg, model_dir=model_dir)
    app: FastAPI | None = None
    try:
        app = app_for(svc)
        freeze_heap()
        svc.start()
        log.warning("serving %s on http://%s:%d", svc.retriever.holder.current().describe(), cfg.serve.host,
                    cfg.serve.port)
        uvicorn.Server(uvicorn_config(app, cfg.serve.host, cfg.serve.port)).run()
    finally:
        close_app(app)
        svc.close()


@dataclass
class ServerHandle:
    url: str
    service: Service | None  # start_background only
    _stop: Callable[[], None]
    process: subprocess.Popen | None = None  # start_subprocess only

    @property
    def retriever(self) -> Retriever | None:
        return self.service.retriever if self.service is not None else None

    def stop(self) -> None:
        self._stop()


def start_background(cfg: Config, retriever: Retriever | None = None, timeout_s: float = 30.0) -> ServerHandle:
    """Serve in a daemon thread on a free loopback port (cfg.serve.port is ignored); `.stop()` ends it
    and closes what it opened (the store too, unless `retriever` was given)."""
    svc = open_service(cfg, retriever)
    app = app_for(svc)
    freeze_heap()
    svc.start()
    sock = listening_socket(cfg.serve.host, 0)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn_config(app, host, port))
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
        close_app(app)
        svc.close()

    return ServerHandle(f"http://{host}:{port}", svc, stop)


def start_subprocess(index: str | Path, store: str, store_path: str | None = None, max_k: int = 1000,
                     timeout_s: float = 120.0, config: str | Path | None = None,
                     env: dict[str, str] | None = None, workers: int = 1) -> ServerHandle:
    """`towerann serve --workers N` in a child process on a free port; waits for /readyz (`handle.process`
    is the child: the server itself, or with workers > 1 the parent of the workers)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "towerann.service.commands", "serve", "--index", str(index), "--store", store,
           "--port", str(port), "--max-k", str(max_k), "--workers", str(workers)]
    if store_path:
        cmd += ["--store-path", store_path]
    if config:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BackendUnavailable(f"`towerann serve` (port {port}) exited with {proc.returncode} before it was ready")
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

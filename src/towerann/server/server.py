"""Run the HTTP app: in the foreground (`towerann serve`), in a background thread (demo, tests) or
in a subprocess (benchmarks, where the load generator must not share the server's GIL).

Both in-process ways attach the live re-tune (server.live_retune: the reservoir of live queries and the
loop that re-tunes a bundle whose online recall is measurably under its target) to the service, with its
metrics in the app's registry, and close it (saving the reservoir) on the way out."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from towerann.config import Config
from towerann.errors import BackendUnavailable, ConfigError, TowerannError
from towerann.index.snapshot import resolve
from towerann.server.asgi import app_for, close_app, freeze_heap, uvicorn_config
from towerann.server.grpc_server import http_server
from towerann.server.live_retune import start_live_retune
from towerann.server.logs import serving
from towerann.server.wiring import Service, open_service
from towerann.server.workers import listening_socket
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.retriever import Retriever
from towerann.serving.retune_loop import RetuneLoop

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --ray: a search waits this long for the shard actors; a later one is left out (partial answer)
SHARD_DEADLINE_S = 0.5
RAY_NO_RELOAD = (
    "this server's index lives on Ray shard actors (towerann serve --ray), where a bundle cannot be "
    "swapped as one unit yet: restart the server to serve the version CURRENT names (docs/shards.md)"
)


class RayReloadRefused:
    """The reloads of a server over Ray shards: refused. The Reloader would load the new bundle's shards
    into this process, and switching the actors' version in place would pair the old bundle's user
    tower and id map with the new index; so neither the admin route nor a CURRENT watcher swaps."""

    def reload(self, reason: str = "reload asked for") -> dict[str, Any]:
        log.warning("reload refused (%s): %s", reason, RAY_NO_RELOAD, extra={"event": "reload_refused"})
        return {"outcome": "refused", "error": RAY_NO_RELOAD}

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        pass  # nothing is ever loaded, so there is no outcome to count

    def start(self, poll_s: float) -> None:
        if poll_s > 0:
            log.warning("--ray: CURRENT is not watched ([freshness] poll_s ignored); restart to serve a new version")

    def stop(self) -> None:
        pass


def load_ray_bundle(
    cfg: Config, address: str, model_dir: str | None = None, deadline_s: float = SHARD_DEADLINE_S
) -> RetrievalBundle:
    """The configured sharded bundle: model and id map in this process, the index on the Ray
    cluster's shard actors (cluster.ray_shards.attach, pinned to the bundle's version)."""
    from towerann.cluster.ray_shards import attach

    path = resolve(cfg.paths.index)
    given_model = model_dir  # `serve --model`: paired by the rule startup and reload use (check_pairing)
    if model_dir is None and not (path / "model").is_dir():
        model_dir = cfg.paths.model
    try:
        return RetrievalBundle.load(
            path,
            model_dir=model_dir,
            index_loader=lambda p: attach(p.parent, address, version=p.name, deadline_s=deadline_s),
            given_model=given_model,
        )
    except TowerannError:
        raise
    except Exception as e:  # Ray's own errors (no cluster there, an actor that cannot start): one line
        detail = " ".join(str(e).split())[:300]
        raise BackendUnavailable(
            f"--ray {address}: cannot attach the shards of {path} ({type(e).__name__}: {detail})"
        ) from e


def open_ray_service(
    cfg: Config, address: str, model_dir: str | None = None, deadline_s: float = SHARD_DEADLINE_S
) -> Service:
    svc = open_service(cfg, model_dir=model_dir, bundle=load_ray_bundle(cfg, address, model_dir, deadline_s))
    if svc.reloader is not None:
        svc.reloader = RayReloadRefused()  # type: ignore[assignment]  # a BundleReloads that refuses
    return svc


def _one_thread_per_search() -> None:
    """Searches run one thread each, side by side, as the workers' do (server.workers) and as the tuner
    timed every setting (index.tune): faiss's OpenMP pool spins its threads between searches, so a
    one-process ivfpq server at 100 requests/s held both cores and starved a refresh at nice 10."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(limits=1)  # not restored: for the life of the process


def serve_forever(
    cfg: Config,
    model_dir: str | None = None,
    ray_address: str | None = None,
    shard_deadline_s: float = SHARD_DEADLINE_S,
) -> None:
    """`towerann serve`: one process, or [serve] workers processes on one port (server.workers);
    `ray_address`: the index on that Ray cluster's shard actors (one process)."""
    from towerann.server.workers import resolve_workers, run_workers

    n = resolve_workers(cfg)
    if n > 1 and ray_address is not None:
        raise ConfigError(
            f"--ray serves from one process, not {n} workers: give --workers 1 (each front process "
            "keeps its own log of the writes it sent to the shards)"
        )
    if n > 1:
        run_workers(cfg, n, model_dir)
        return
    _one_thread_per_search()
    svc = (
        open_service(cfg, model_dir=model_dir)
        if ray_address is None
        else open_ray_service(cfg, ray_address, model_dir, shard_deadline_s)
    )
    app: FastAPI | None = None
    live: RetuneLoop | None = None
    # uvicorn stops on SIGTERM, then restores the handler it found and raises the signal again: with the
    # default handler the process died there, before the cleanup below (the reservoir was never saved).
    # This one turns it into an exception; after the cleanup, the signal is raised again with the
    # default handler, so the process still ends as killed by SIGTERM.
    main = threading.current_thread() is threading.main_thread()  # signals are the main thread's only
    before = signal.signal(signal.SIGTERM, _terminated) if main else None
    stopped_by_sigterm = False
    try:
        app = app_for(svc)
        live = start_live_retune(svc, app)
        freeze_heap()
        svc.start()
        serving()  # started: towerann's INFO lines (access log, state changes) from here on
        log.info(
            "serving %s on http://%s:%d", svc.retriever.holder.current().describe(), cfg.serve.host, cfg.serve.port
        )
        http_server(uvicorn_config(app, cfg.serve.host, cfg.serve.port), app, cfg.serve).run()  # + gRPC
    except _Terminated:
        stopped_by_sigterm = True
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        try:
            if live is not None:
                live.close()  # saves the reservoir
            close_app(app)
            svc.close()
        finally:
            if main:
                signal.signal(signal.SIGTERM, before)
    if stopped_by_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM reached `towerann serve` (after uvicorn's own graceful stop): clean up, then die by it."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@dataclass
class ServerHandle:
    url: str
    service: Service | None  # start_background only
    _stop: Callable[[], None]
    process: subprocess.Popen | None = None  # start_subprocess only
    retune: RetuneLoop | None = None  # start_background only: the live re-tune (None: the monitor is off)

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
    live = start_live_retune(svc, app)
    freeze_heap()
    svc.start()
    sock = listening_socket(cfg.serve.host, 0)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn_config(app, host, port))
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="towerann-http", daemon=True
    )
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
        if live is not None:
            live.close()  # saves the reservoir
        close_app(app)
        svc.close()

    return ServerHandle(f"http://{host}:{port}", svc, stop, retune=live)


def start_subprocess(
    index: str | Path,
    store: str,
    store_path: str | None = None,
    max_k: int = 1000,
    timeout_s: float = 120.0,
    config: str | Path | None = None,
    env: dict[str, str] | None = None,
    workers: int = 1,
    args: Sequence[str] = (),
    log_file: str | Path | None = None,
    access_log: bool = False,
) -> ServerHandle:
    """`towerann serve --workers N` in a child process on a free port; waits for /readyz (`handle.process`
    is the child: the server itself, or with workers > 1 the parent of the workers). `args`: more flags
    (e.g. ["--ray", ADDRESS], ["--log-format", "json"]); `log_file`: where its stderr (the server's log)
    goes, else this process's. `access_log`: one line per request in that log (off by default here: a
    benchmark's load would flood the terminal it was started from)."""
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "towerann.server.commands",
        "serve",
        "--index",
        str(index),
        "--store",
        store,
        "--port",
        str(port),
        "--max-k",
        str(max_k),
        "--workers",
        str(workers),
    ]
    if store_path:
        cmd += ["--store-path", store_path]
    if config:
        cmd += ["--config", str(config)]
    cmd += ["--access-log" if access_log else "--no-access-log", *args]
    log = open(log_file, "ab") if log_file is not None else None
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stderr=log)
    finally:
        if log is not None:
            log.close()  # the child holds its own descriptor
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BackendUnavailable(
                f"`towerann serve` (port {port}) exited with {proc.returncode} before it was ready"
            )
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

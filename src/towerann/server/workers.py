"""`towerann serve --workers N`: N processes, each the whole service, answering on one port.

The parent binds the listening socket once, loads the bundle and forks N workers from it (they
share its pages: see _preload); each one opens the store and the delta log, replays the log and
runs uvicorn on the inherited socket (the kernel hands each new connection to one of them). The
parent serves nothing: it reports the first worker that fails to start (its one-line error and exit
code), stops every worker on SIGTERM/SIGINT, and stops them all when one dies (exit 1), so a
supervisor (systemd, Kubernetes) restarts the whole server.

What the workers share, and how:
- item writes: the delta log. Each worker applies the entries the others logged before each write
  of its own (freshness.live.ItemWriter, shared=True), every [freshness] tail_ms, and before a
  search when another worker has acknowledged a write it has not applied yet (Peers, through a
  shared-memory array of acknowledged seqs): a write acknowledged by one worker is in every search
  that starts after the acknowledgement, on every worker.
- bundles: CURRENT, which every worker's Reloader polls every [freshness] poll_s.
- user features: the feature store, which must be Redis (the embedded store lives in one process).
- metrics: prometheus_client's multiprocess mode in a temp directory of this server, so /metrics
  answers the totals of all workers; the X-Towerann-Worker header says which worker answered.
- gRPC ([serve] grpc_port): each worker binds the port itself with SO_REUSEPORT and serves it on its own
  event loop beside HTTP (server.grpc_server); the kernel spreads new connections, so one gRPC channel
  (one HTTP/2 connection) stays with one worker. The parent imports no gRPC (fork safety): it only
  checks that the port can be bound.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import TYPE_CHECKING, Any

from towerann.config import Config
from towerann.errors import ConfigError, TowerannError
from towerann.storeurl import parse_store_url

if TYPE_CHECKING:  # the parent imports no web framework, model or bundle code: only the workers do
    from towerann.server.wiring import Service

log = logging.getLogger(__name__)

STOP_WAIT_S = 15.0  # a worker gets this long to finish its requests after SIGTERM, then SIGKILL


class WorkerFailed(TowerannError):
    """A worker process could not start (its own error is the message) or died."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def shared_store_problem(cfg: Config) -> str | None:
    """Why the configured feature store cannot serve several worker processes, or None if it can.

    The embedded store answers reads from its own process's memory (SQLite only persists them), so a
    click recorded by one worker would never reach the others; Redis is shared by every process."""
    if parse_store_url(cfg.features.store).is_redis:
        return None
    return (
        f"feature store {cfg.features.store!r} lives in one process's memory, so a click recorded by one worker "
        "would not count on the others; serve several workers with --store redis://HOST:PORT/DB "
        "([features] store), or serve one (--workers 1)"
    )


def resolve_workers(cfg: Config) -> int:
    """How many processes to serve with: [serve] workers, or (0) one per core when the feature store
    can be shared across processes and one otherwise. Asking for several with a store that cannot be
    shared is refused (ConfigError, one line)."""
    asked = cfg.serve.workers
    problem = shared_store_problem(cfg)
    if asked == 0:
        if problem is not None:
            return 1
        return machine_cores()
    if asked > 1 and problem is not None:
        raise ConfigError(f"--workers {asked}: {problem}")
    return asked


def listening_socket(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; without it, Nagle plus
    # delayed ACKs add 40 ms to every response (uvicorn writes headers and body separately).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from e
    sock.listen(2048)  # connections queue here until the workers accept them
    return sock


_PRELOADED: Any = None  # the bundle the parent loaded, inherited by the workers it forks (never pickled)


def run_workers(cfg: Config, n: int, model_dir: str | None = None) -> None:
    """Serve with `n` worker processes until SIGTERM/SIGINT; raise WorkerFailed if one fails."""
    global _PRELOADED
    if cfg.freshness.poll_s <= 0:
        log.warning(
            "[freshness] poll_s = 0: a new bundle (CURRENT, POST /v1/admin/reload) reaches only the worker "
            "that is asked to reload; set poll_s > 0 so every worker picks it up"
        )
    sock = listening_socket(cfg.serve.host, cfg.serve.port)
    if cfg.serve.grpc_port:  # each worker binds it (SO_REUSEPORT): a port another server holds fails here
        from towerann.server.grpc_server import check_port_free

        try:
            check_port_free(cfg.serve.host, cfg.serve.grpc_port)
        except BaseException:
            sock.close()
            raise
    metrics_dir = tempfile.mkdtemp(prefix="towerann-metrics-")
    # prometheus_client reads it at import: set before anything here or in the workers imports it
    env_before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers: list[multiprocessing.process.BaseProcess] = []
    pipes = []
    try:
        ctx = _preload(cfg, model_dir)
        acked = ctx.RawArray("q", n)  # per worker: the last delta-log seq it acknowledged (workers.Peers)
        pids = ctx.RawArray("q", n)  # per worker: its pid, for the process metrics of every worker
        for i in range(n):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(
                target=worker_main,
                args=(cfg, model_dir, sock, i, child_end, metrics_dir, acked, pids),
                name=f"towerann-worker-{i}",
                daemon=False,
            )
            p.start()
            child_end.close()
            workers.append(p)
            pipes.append(parent_end)
        # The workers hold it now. Dropped here, what reference counting frees is gone from this process;
        # no collection: it would write to every object still frozen and so copy the pages they share
        # with the workers (measured at 200k items: 1.6x the memory of one worker instead of 1.2x).
        _PRELOADED = None
        _wait_until_loaded(workers, pipes, stopping)
        if stopping:
            return
        for pipe in pipes:  # all loaded: now they may answer (none answers before every one could)
            pipe.send(("go",))
        from towerann.server.logs import serving

        serving()
        log.info(
            "serving on http://%s:%d%s with %d workers (pids %s)",
            cfg.serve.host,
            cfg.serve.port,
            f" and gRPC {cfg.serve.host}:{cfg.serve.grpc_port}" if cfg.serve.grpc_port else "",
            n,
            " ".join(str(p.pid) for p in workers),
        )
        while not stopping:
            dead = [p for p in workers if p.exitcode is not None]
            if dead:
                raise WorkerFailed(
                    f"worker {workers.index(dead[0])} (pid {dead[0].pid}) exited with "
                    f"{dead[0].exitcode}; stopped the others"
                )
            multiprocessing.connection.wait([p.sentinel for p in workers], timeout=0.2)
    finally:
        _PRELOADED = None
        _stop_all(workers)
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if env_before is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = env_before


def _preload(cfg: Config, model_dir: str | None) -> Any:
    """Load the bundle and the web stack here, once, and fork the workers from it: they share the pages
    (the index, the id maps, the imported modules) until they write to them; measured at 200k items,
    that is most of a worker. Return the multiprocessing context to start the workers with.

    Forking is safe only while no library has started threads it needs in the child: faiss's OpenMP
    pool is the one that hangs a child's first search, so the workers run it single-threaded (they
    answer one request at a time each anyway), set before faiss is loaded. A caller that has loaded
    faiss already gets workers spawned from scratch instead, each loading the bundle itself."""
    global _PRELOADED
    import sys

    if "faiss" in sys.modules:
        return multiprocessing.get_context("spawn")
    os.environ["OMP_NUM_THREADS"] = "1"
    import gc

    import towerann.server.asgi  # noqa: F401 - the web stack, imported once for all workers
    from towerann.server.wiring import load_bundle

    _PRELOADED = load_bundle(cfg, model_dir)  # a bad bundle: its one-line error, before any worker starts
    gc.collect()
    gc.freeze()  # the workers' collections then never touch (and so copy) these objects
    return multiprocessing.get_context("fork")


def _wait_until_loaded(workers: list, pipes: list, stopping: list[int]) -> None:
    """Until every worker says "loaded"; the first one that reports an error or dies raises WorkerFailed."""
    waiting = set(range(len(workers)))
    while waiting and not stopping:
        for i in list(waiting):
            if pipes[i].poll():
                try:
                    message = pipes[i].recv()
                except EOFError:
                    message = None
                if message is not None and message[0] == "loaded":
                    waiting.discard(i)
                    continue
                if message is not None:  # ("error", text, exit code)
                    raise WorkerFailed(message[1], message[2])
            if workers[i].exitcode is not None:
                raise WorkerFailed(
                    f"worker {i} (pid {workers[i].pid}) exited with {workers[i].exitcode} "
                    "while starting; see its log above"
                )
        multiprocessing.connection.wait(
            [*(pipes[i] for i in waiting), *(workers[i].sentinel for i in waiting)], timeout=0.2
        )


def _stop_all(workers: list) -> None:
    """SIGTERM every live worker (uvicorn finishes the requests in flight), SIGKILL what outlives STOP_WAIT_S."""
    from prometheus_client import multiprocess

    for p in workers:
        if p.exitcode is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_WAIT_S
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            log.warning("worker pid %d did not stop within %.0fs; killing it", p.pid, STOP_WAIT_S)
            p.kill()
            p.join()
        multiprocess.mark_process_dead(p.pid)


# ---- in a worker process ------------------------------------------------------------------------


def worker_main(
    cfg: Config,
    model_dir: str | None,
    sock: socket.socket,
    index: int,
    conn: multiprocessing.connection.Connection,
    metrics_dir: str,
    acked: Any,
    pids: Any = None,
) -> None:
    """One worker: the whole service on the inherited socket. Reports ("loaded",) or ("error", line, code),
    then answers requests once the parent says ("go",) (every worker has loaded). `pids`: shared memory,
    one slot per worker, where each one writes its pid (the process metrics of every worker)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the parent's handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (SIGTERM) on Ctrl-C
    from towerann.server.logs import configure_logging, serving
    from towerann.storeurl import redact

    # a spawned worker starts with no logging set up, a forked one with the parent's: the same either way
    configure_logging(cfg.serve.log_format, worker=str(index), access_log=cfg.serve.access_log)
    if pids is not None:
        pids[index] = os.getpid()
    _die_with_parent()
    try:
        from towerann.server.asgi import app_for, freeze_heap
        from towerann.server.wiring import open_service

        svc = open_service(cfg, model_dir=model_dir, shared=True, bundle=_PRELOADED)
    except TowerannError as e:
        conn.send(("error", redact(str(e)), e.exit_code))
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        conn.send(("error", f"worker {index} failed to start: {type(e).__name__}: {redact(str(e))}", 1))
        raise
    app = None
    live = None
    # uvicorn stops on SIGTERM, then raises it again with the handler it found: this one turns that into
    # an exception, so the cleanup below runs (the reservoir of live queries is saved); then the worker
    # dies by SIGTERM as before
    signal.signal(signal.SIGTERM, _terminated)
    stopped_by_sigterm = False
    try:
        peers = Peers(svc, acked, index)
        parent = os.getppid()
        app = app_for(
            svc,
            worker=str(index),
            metrics_dir=metrics_dir,
            freshen=peers.freshen,
            processes=None if pids is None else lambda: {"parent": parent, **{str(i): p for i, p in enumerate(pids)}},
        )
        peers.write_pool = getattr(app.state, "write_pool", None)
        from towerann.server.live_retune import start_live_retune

        live = start_live_retune(svc, app, worker=str(index))
        freeze_heap()
        conn.send(("loaded",))
        try:
            conn.recv()  # ("go",)
        except EOFError:  # the parent is gone, or stopping before all were loaded
            return
        svc.start()
        serving()
        _serve_on(svc, app, sock, peers)
    except _Terminated:
        stopped_by_sigterm = True
    finally:
        from towerann.server.asgi import close_app

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        if live is not None:
            live.close()  # saves this worker's reservoir
        close_app(app)
        svc.close()
    if stopped_by_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM reached a worker (after uvicorn's own graceful stop): clean up, then die by it."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _die_with_parent() -> None:
    """SIGTERM this worker when the parent dies, even by SIGKILL: no orphan keeps the port (Linux)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        raise SystemExit(1)


def _serve_on(svc: Service, app: Any, sock: socket.socket, peers: Peers) -> None:
    from towerann.server.asgi import uvicorn_config
    from towerann.server.grpc_server import http_server

    config = uvicorn_config(app, svc.cfg.serve.host, svc.cfg.serve.port)
    # with [serve] grpc_port, gRPC beside HTTP on this worker's loop, its port bound with SO_REUSEPORT
    server = http_server(config, app, svc.cfg.serve, reuse_port=True)

    async def main() -> None:
        stop: list[bool] = []
        tail = asyncio.create_task(peers.tail(stop))
        try:
            await server.serve(sockets=[sock])
        finally:
            stop.append(True)
            await tail  # ends within one tail interval; never left waiting on a closed loop

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())


class Peers:
    """This worker's view of the others' item writes.

    `acked` is shared memory with one slot per worker: the last seq that worker acknowledged (set
    before its answer goes out). A search that finds a slot ahead of the served bundle's delta_seq
    first applies the log up to there (`freshen`, awaited by the candidates handler), so a write
    acknowledged by any worker is in every search that starts after the acknowledgement, on every
    worker. `tail` applies the others' writes every [freshness] tail_ms anyway, so searches rarely
    have to wait. If the log cannot be read, the search is answered from what this worker has."""

    def __init__(self, svc: Service, acked: Any, index: int):
        self.svc, self.acked, self.index = svc, acked, index
        self.write_pool: Any = None  # the app's write thread; None (no app): apply on the loop
        self._running: asyncio.Task | None = None
        self._failing = False
        svc.writer.on_written = self.written

    def written(self, seq: int) -> None:
        if seq > self.acked[self.index]:
            self.acked[self.index] = seq

    def behind(self) -> bool:
        holder = self.svc.writer.holder
        return holder.ready and max(self.acked) > holder.current().delta_seq

    async def freshen(self) -> None:
        """Before a search. Waits at most [features] timeout_ms (a hung Redis log must not hold searches:
        past it, the search is answered without the writes not applied yet)."""
        if self.behind():
            try:
                await asyncio.wait_for(self.catch_up(), self.svc.cfg.features.timeout_ms / 1e3)
            except TimeoutError:
                pass

    async def catch_up(self) -> None:
        """One catch-up at a time; concurrent callers wait for the one under way (and a next one if
        that one had already started before their write was acknowledged)."""
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._catch_up_once())
        await asyncio.shield(self._running)
        if self.behind():  # acknowledged after that catch-up had read the log
            if self._running.done():
                self._running = asyncio.ensure_future(self._catch_up_once())
            await asyncio.shield(self._running)

    async def _catch_up_once(self) -> None:
        from towerann.serving.app import on_loop
        from towerann.storeurl import redact

        writer, loop = self.svc.writer, asyncio.get_running_loop()
        try:
            if self.write_pool is None:
                writer.catch_up()
            elif writer.delta.available():  # read in the write thread, only the change on the loop
                await loop.run_in_executor(self.write_pool, functools.partial(writer.catch_up, apply_on=on_loop(loop)))
            else:
                return
            if self._failing:
                log.warning("delta log readable again: the other workers' writes are applied again")
            self._failing = False
        except Exception as e:  # keep serving; say so once per outage, not every tail interval
            if not self._failing:
                log.warning(
                    "cannot read the other workers' writes from the delta log (%s: %s); searches are "
                    "answered without them until it can be read",
                    type(e).__name__,
                    redact(str(e)),
                )
            self._failing = True

    async def tail(self, stop: list[bool]) -> None:
        every = self.svc.cfg.freshness.tail_ms / 1e3
        while not stop:
            await asyncio.sleep(every)
            if not stop:
                await self.catch_up()

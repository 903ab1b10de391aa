"""`towerann serve --workers N`: N processes, each the whole service, answering on one port.

The parent binds the listening socket once and spawns N workers; each one loads the bundle, opens
the store and the delta log, and runs uvicorn on the inherited socket (the kernel hands each new
connection to one of them). The parent serves nothing: it reports the first worker that fails to
start (its one-line error and exit code), stops every worker on SIGTERM/SIGINT, and stops them all
when one dies (exit 1), so a supervisor (systemd, Kubernetes) restarts the whole server.

What the workers share, and how:
- item writes: the delta log. Each worker applies the entries the others logged every
  [freshness] tail_ms, and before each write of its own (freshness.live.ItemWriter, shared=True);
  a write acknowledged by one worker is searchable on every other within about tail_ms.
- bundles: CURRENT, which every worker's Reloader polls every [freshness] poll_s.
- user features: the feature store, which must be Redis (the embedded store lives in one process).
- metrics: prometheus_client's multiprocess mode in a temp directory of this server, so /metrics
  answers the totals of all workers; the X-Towerann-Worker header says which worker answered.
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
from typing import Any

from typing import TYPE_CHECKING

from towerann.config import Config
from towerann.errors import ConfigError, TowerannError
from towerann.storeurl import parse_store_url

if TYPE_CHECKING:  # the parent imports no web framework, model or bundle code: only the workers do
    from towerann.service.wiring import Service

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
    return (f"feature store {cfg.features.store!r} lives in one process's memory, so a click recorded by one worker "
            "would not count on the others; serve several workers with --store redis://HOST:PORT/DB "
            "([features] store), or serve one (--workers 1)")


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
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (see server.start_background)
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


def run_workers(cfg: Config, n: int, model_dir: str | None = None) -> None:
    """Serve with `n` worker processes until SIGTERM/SIGINT; raise WorkerFailed if one fails."""
    sock = listening_socket(cfg.serve.host, cfg.serve.port)
    metrics_dir = tempfile.mkdtemp(prefix="towerann-metrics-")
    # prometheus_client reads it at import: the workers, spawned below, inherit it
    env_before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers: list[multiprocessing.process.BaseProcess] = []
    pipes = []
    try:
        for i in range(n):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(cfg, model_dir, sock, i, child_end, metrics_dir),
                            name=f"towerann-worker-{i}", daemon=False)
            p.start()
            child_end.close()
            workers.append(p)
            pipes.append(parent_end)
        _wait_until_loaded(workers, pipes, stopping)
        if stopping:
            return
        for pipe in pipes:  # all loaded: now they may answer (none answers before every one could)
            pipe.send(("go",))
        log.warning("serving on http://%s:%d with %d workers (pids %s)", cfg.serve.host, cfg.serve.port, n,
                    " ".join(str(p.pid) for p in workers))
        while not stopping:
            dead = [p for p in workers if p.exitcode is not None]
            if dead:
                raise WorkerFailed(f"worker {workers.index(dead[0])} (pid {dead[0].pid}) exited with "
                                   f"{dead[0].exitcode}; stopped the others")
            multiprocessing.connection.wait([p.sentinel for p in workers], timeout=0.2)
    finally:
        _stop_all(workers)
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if env_before is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = env_before


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
                raise WorkerFailed(f"worker {i} (pid {workers[i].pid}) exited with {workers[i].exitcode} "
                                   "while starting; see its log above")
        multiprocessing.connection.wait([*(pipes[i] for i in waiting), *(workers[i].sentinel for i in waiting)],
                                        timeout=0.2)


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

def worker_main(cfg: Config, model_dir: str | None, sock: socket.socket, index: int,
                conn: multiprocessing.connection.Connection, metrics_dir: str) -> None:
    """One worker: the whole service on the inherited socket. Reports ("loaded",) or ("error", line, code),
    then answers requests once the parent says ("go",) (every worker has loaded)."""
    from towerann.storeurl import redact, redact_logging

    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    redact_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (SIGTERM) on Ctrl-C
    _die_with_parent()
    try:
        from towerann.service.server import app_for, freeze_heap
        from towerann.service.wiring import open_service

        svc = open_service(cfg, model_dir=model_dir, shared=True)
    except TowerannError as e:
        conn.send(("error", redact(str(e)), e.exit_code))
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        conn.send(("error", f"worker {index} failed to start: {type(e).__name__}: {redact(str(e))}", 1))
        raise
    app = None
    try:
        app = app_for(svc, worker=str(index), metrics_dir=metrics_dir)
        freeze_heap()
        conn.send(("loaded",))
        try:
            conn.recv()  # ("go",)
        except EOFError:  # the parent is gone, or stopping before all were loaded
            return
        svc.start()
        _serve_on(svc, app, sock)
    finally:
        from towerann.service.server import close_app

        close_app(app)
        svc.close()


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


def _serve_on(svc: Service, app: Any, sock: socket.socket) -> None:
    import uvicorn

    from towerann.service.server import uvicorn_config

    config = uvicorn_config(app, svc.cfg.serve.host, svc.cfg.serve.port)
    server = uvicorn.Server(config)

    async def main() -> None:
        stop: list[bool] = []
        tail = asyncio.create_task(tail_delta_log(svc, getattr(app.state, "write_pool", None), stop))
        try:
            await server.serve(sockets=[sock])
        finally:
            stop.append(True)
            await tail  # ends within one tail interval; never left waiting on a closed loop

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())


async def tail_delta_log(svc: Service, write_pool: Any, stop: list[bool]) -> None:
    """Every [freshness] tail_ms, apply the writes the other workers logged. A local log (SQLite) is
    read on the loop, as local writes are; a Redis log in the write thread, handing only the index
    change to the loop (serving.app.on_loop), so searches never wait on Redis."""
    from towerann.serving.app import on_loop
    from towerann.storeurl import redact

    every = svc.cfg.freshness.tail_ms / 1e3
    writer, loop = svc.writer, asyncio.get_running_loop()
    failing = False
    while not stop:
        await asyncio.sleep(every)
        if stop:
            return
        try:
            if write_pool is None:
                writer.catch_up()
            elif writer.delta.available():
                await loop.run_in_executor(write_pool, functools.partial(writer.catch_up, apply_on=on_loop(loop)))
            else:
                continue
            if failing:
                log.warning("delta log readable again: the other workers' writes are applied again")
            failing = False
        except Exception as e:  # keep tailing; say so once per outage, not every 50 ms
            if not failing:
                log.warning("cannot read the other workers' writes from the delta log (%s: %s); retrying every "
                            "%.0f ms", type(e).__name__, redact(str(e)), every * 1e3)
            failing = True

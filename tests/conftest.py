"""Shared fixtures: real parts only. A real redis-server, started once per test session."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Bench reports written by tests skip measuring the machine's SGEMM and bandwidth (a second each);
# tests/unit/tools/test_bench_docs.py measures them once, explicitly.
os.environ.setdefault("TOWERANN_BENCH_NO_CEILINGS", "1")


@pytest.fixture(autouse=True)
def _root_log_handlers_of_a_test_go_with_it() -> Iterator[None]:
    """A CLI call in this process (cli.main's logging.basicConfig, a server's configure_logging) adds a
    root handler writing to the test's captured stderr, which pytest closes after the test: a later
    test's log line would then print "--- Logging error --- I/O operation on closed file"."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):  # pytest's: its own
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _scann_in_process_after_each_test() -> Iterator[None]:
    """A server opened in this process (server.wiring.open_service) loads ScaNN into helper processes from
    then on; the next test starts from the in-process default again, as a fresh process would."""
    yield
    from towerann.index import scann

    scann.load_in_helper_process(False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_ping(url: str, proc: subprocess.Popen, timeout_s: float = 10.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # exited: most likely the port was taken in between
                return False
            try:
                if client.ping():
                    return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()


def _redis_exe() -> str:
    """Debian's redis-server; a skip with the reason where it is missing, an error under CI."""
    exe = shutil.which("redis-server")
    if exe is None:
        reason = "redis-server is not on PATH; install it (apt-get install redis-server) to run the Redis tests"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is an error, not a skip)")
        pytest.skip(reason)
    return exe


@pytest.fixture
def spawn_redis(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """A factory of private redis-server processes on loopback (for tests that stop, kill or restart
    one): spawn(port, *extra_args); any still running after the test is killed."""
    exe = _redis_exe()
    procs: list[subprocess.Popen] = []

    def spawn(port: int, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def private_redis(spawn_redis: Callable[..., subprocess.Popen]) -> Callable[..., subprocess.Popen]:
    """A factory of redis-server processes of the test's own (spawn_redis) that answer: start(port, *extra_args)
    returns the process once it answers PING."""
    import redis

    def start(port: int, *extra: str) -> subprocess.Popen:
        proc = spawn_redis(port, *extra)
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return proc
                except redis.exceptions.ConnectionError:
                    assert time.monotonic() < deadline and proc.poll() is None, "private redis-server did not start"
                    time.sleep(0.05)
        finally:
            client.close()

    return start


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start Debian's redis-server on a free loopback port, no persistence; yield its URL."""
    exe = _redis_exe()
    workdir = tmp_path_factory.mktemp("redis")
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = _free_port()
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        if _wait_for_ping(url, proc):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail("redis-server did not answer PING after 3 attempts on free ports")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key namespace per test, so tests sharing the server never see each other's keys."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (for connection-refused tests)."""
    return _free_port()


@pytest.fixture(scope="session")
def serving_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small real bundle for the whole session (towerann.bench.serve.prepare: a synthetic dataset of
    2000 items and 1000 users, a dim-32 model trained 2 epochs, its vectors, an exact bundle root):
    {"data", "model", "vectors", "index"} paths."""
    from towerann.bench.serve import prepare

    return prepare(
        tmp_path_factory.getbasetemp() / "serving-bundle", items=2000, users=1000, dim=32, epochs=2, kind="exact"
    )


def tuner_cost_ms(kind: str, params: dict | None, search: Callable, queries) -> float:  # type: ignore[type-arg]
    """A fixed cost model for the tuner (towerann.index.tune.Timer): a setting costs (1 + the sum of its
    parameters) / 1000 ms, exact search 1000 ms. What the tests that tune check is that the choice follows
    the timings and reaches the target; a stopwatch on a shared 2-core machine makes that a coin flip
    (a setting refused as slower than exact search on one run, kept on the next)."""
    search(queries[:1])  # the search it stands for still runs
    if params is None:
        return 1000.0
    return (1 + sum(v for v in params.values() if isinstance(v, (int, float)))) / 1e3


@pytest.fixture
def fixed_tuner_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tuning in the test (CLI, publish_bundle, build_index) timed by tuner_cost_ms."""
    monkeypatch.setattr("towerann.index.tune.measured_p50_ms", tuner_cost_ms)


@pytest.fixture(scope="module")
def fixed_tuner_costs_module() -> Iterator[None]:
    """fixed_tuner_costs for a module's shared fixtures (a snapshot built and tuned once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("towerann.index.tune.measured_p50_ms", tuner_cost_ms)
        yield

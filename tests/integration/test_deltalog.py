"""The delta log keeps every acknowledged item write, in order, on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from towerann.errors import BackendUnavailable, BadRequest
from towerann.freshness.deltalog import SQLiteDeltaLog, open_delta_log


@pytest.fixture(params=["sqlite", "redis"])
def log(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        d = open_delta_log("embedded", tmp_path / "delta.sqlite")
    else:
        url = request.getfixturevalue("redis_server")
        d = open_delta_log(url, key=f"test:{request.getfixturevalue('redis_prefix')}delta")
    yield d
    d.close()


def test_entries_come_back_in_order_after_a_cutoff(log) -> None:  # type: ignore[no-untyped-def]
    a = log.append("upsert", "i1", {"category": "c1", "price": 2.5})
    b = log.append("available", "i1", {"available": False})
    c, d = log.append_many([("delete", "i2", {}), ("upsert", "i3", {"category": "c2"})])
    assert a.seq < b.seq < c.seq < d.seq
    assert log.last_seq() == d.seq
    assert [(e.op, e.item_id, e.payload) for e in log.since(b.seq)] == [
        ("delete", "i2", {}),
        ("upsert", "i3", {"category": "c2"}),
    ]
    assert [e.item_id for e in log.since(0)] == ["i1", "i1", "i2", "i3"]
    assert list(log.since(d.seq)) == []


def test_bad_entries_are_refused(log) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest, match="op"):
        log.append("rename", "i1", {})
    with pytest.raises(BadRequest, match="item_id"):
        log.append("delete", "", {})
    assert log.last_seq() == 0


def test_an_unknown_op_is_refused_at_write_naming_the_known_ones(log) -> None:  # type: ignore[no-untyped-def]
    """A replay skips an op it does not know (it once applied it as a delete); the log never takes one."""
    for write in (
        lambda: log.append("zap", "i1", {}),
        lambda: log.append_many([("upsert", "i1", {"category": "c1"}), ("zap", "i1", {})]),
    ):
        with pytest.raises(BadRequest, match=r"'zap'.*upsert, available, delete"):
            write()
    assert log.last_seq() == 0 and list(log.since(0)) == []  # all or none: the good entry was not written


def test_sqlite_log_survives_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "delta.sqlite"
    code = (
        "import os, signal; from towerann.freshness.deltalog import open_delta_log\n"
        f"d = open_delta_log('embedded', {str(path)!r})\n"
        "for i in range(50): d.append('upsert', f'i{i}', {'n': i})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy())
    assert proc.returncode == -9
    d = open_delta_log("embedded", path)
    assert [e.payload["n"] for e in d.since(0)] == list(range(50))
    d.close()


def test_unreachable_redis_is_a_clear_error(free_port: int) -> None:
    with pytest.raises(BackendUnavailable, match="redis-server"):
        open_delta_log(f"redis://127.0.0.1:{free_port}/0")


def test_a_dead_or_hung_redis_is_backend_unavailable_on_every_call(private_redis, free_port: int) -> None:
    """append/since/last_seq of the Redis log: 503-type errors (were a raw redis ConnectionError: HTTP 500),
    within the deadline when Redis hangs, at once while it is marked down, and fine again once it is back."""
    import signal
    import time

    proc = private_redis(free_port, "--appendonly", "no")
    # retry_s 2: the fail-fast window outlasts any scheduling pause between the calls below
    log = open_delta_log(f"redis://127.0.0.1:{free_port}/0", timeout_s=0.2, retry_s=2.0)
    try:
        first = log.append("upsert", "i1", {"n": 1})
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable, match="delta log"):
            log.append("upsert", "i2", {})
        assert time.perf_counter() - t0 < 1.5  # the 0.2 s deadline (redis-py's own retries are off)
        for call in (lambda: log.append("delete", "i1", {}), lambda: list(log.since(0)), log.last_seq):
            with pytest.raises(BackendUnavailable, match="not retried"):  # marked down: refused, no waiting
                call()
        assert not log.available()
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(2.1)
        assert log.last_seq() >= first.seq and log.available()
        proc.kill()
        proc.wait(timeout=10)
        time.sleep(0.35)
        for call in (lambda: log.append("delete", "i1", {}), lambda: list(log.since(0)), log.last_seq):
            with pytest.raises(BackendUnavailable):
                call()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)
        log.close()


@pytest.mark.parametrize(
    "settings, outcome",
    [
        (("--appendonly", "no"), "refused"),
        (("--appendonly", "yes", "--appendfsync", "everysec"), "appendonly yes, appendfsync everysec"),
        (("--appendonly", "yes", "--appendfsync", "always"), "appendonly yes, appendfsync always"),
        (("--appendonly", "no", "--rename-command", "CONFIG", ""), "refused"),
    ],
)
def test_check_durable_reads_the_servers_persistence(
    private_redis, tmp_path: Path, free_port: int, settings, outcome
) -> None:  # type: ignore[no-untyped-def]
    from towerann.errors import ConfigError
    from towerann.freshness.deltalog import check_durable

    proc = private_redis(free_port, *settings)
    log = open_delta_log(f"redis://127.0.0.1:{free_port}/0")
    try:
        if outcome == "refused":
            with pytest.raises(ConfigError, match="allow_volatile"):
                check_durable(log)
            assert check_durable(log, allow_volatile=True) == "volatile (allowed)"
        else:
            assert check_durable(log) == outcome
    finally:
        log.close()
        proc.kill()
        proc.wait(timeout=10)
    sqlite = open_delta_log("embedded", tmp_path / "d.sqlite")
    assert check_durable(sqlite) == "sqlite"
    sqlite.close()


def test_the_sqlite_log_is_durable_before_an_ack(tmp_path) -> None:
    """WAL with synchronous NORMAL: a committed append survives a killed process (tested above by
    SIGKILL) and the file cannot be corrupted by a power cut; OFF would acknowledge what the OS was
    never asked to write."""
    log = SQLiteDeltaLog(str(tmp_path / "delta.sqlite"))
    try:
        assert log.durability() == {"journal_mode": "wal", "synchronous": "normal"}
    finally:
        log.close()

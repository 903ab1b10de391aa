"""The delta log keeps every acknowledged item write, in order, on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from towerann.errors import BackendUnavailable, BadRequest
from towerann.freshness.deltalog import open_delta_log


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
    assert [(e.op, e.item_id, e.payload) for e in log.since(b.seq)] == [("delete", "i2", {}), ("upsert", "i3", {"category": "c2"})]
    assert [e.item_id for e in log.since(0)] == ["i1", "i1", "i2", "i3"]
    assert list(log.since(d.seq)) == []


def test_bad_entries_are_refused(log) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest, match="op"):
        log.append("rename", "i1", {})
    with pytest.raises(BadRequest, match="item_id"):
        log.append("delete", "", {})
    assert log.last_seq() == 0


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

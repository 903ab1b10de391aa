"""Faults, with real parts: a private redis-server paused (SIGSTOP), killed and restarted on the same
port, a Redis that does not log its writes, a password that must never leak, a poisoned delta log,
corrupted artifacts at startup. Every wait has a deadline; all traffic stays on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.data.dataset import read_items
from towerann.errors import ConfigError
from towerann.freshness.deltalog import open_delta_log
from towerann.server.server import free_port, start_background

TOKEN = "fault-token-3c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "pw-Zq81-never-shown"


def wait_for(cond: Callable[[], bool], timeout_s: float = 15.0, step_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step_s)


class PrivateRedis:
    """A redis-server of one test's own (free port, own dir), to pause, kill and restart."""

    def __init__(
        self, workdir: Path, password: str | None = PASSWORD, appendonly: bool = True, appendfsync: str = "always"
    ):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not on PATH (CI is set, so this is an error)")
            pytest.skip("redis-server is not on PATH; apt-get install redis-server")
        self.dir, self.password = workdir, password
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            appendfsync,
        ] + (["--requirepass", password] if password else [])
        self.proc: subprocess.Popen | None = None
        for _ in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            if self.start():
                break
        else:
            pytest.fail("private redis-server did not start")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> bool:
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.ping():
                        return True
                except redis.exceptions.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.kill()
        return False

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process is killed too, but leaves no zombie wait
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        assert self.start(), "redis-server did not come back on its port"

    def close(self) -> None:
        self.kill()


def redis_config(bundle_paths: dict[str, Path], tmp_path: Path, url: str, **freshness: Any) -> Config:
    """Serve the shared bundle with a Redis store (the delta log is a stream in that Redis, so the
    shared bundle directory is never written)."""
    (tmp_path / "token").write_text(TOKEN)
    return Config(
        serve=ServeConfig(max_k=200),
        paths=PathsConfig(index=str(bundle_paths["index"]), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store=url, timeout_ms=100, write_timeout_ms=500, retry_s=0.5),
        freshness=FreshnessConfig(
            adopt_log=True, token_file=str(tmp_path / "token"), poll_s=0.0, timeout_ms=500, **freshness
        ),
    )


def item_row(bundle_paths: dict[str, Path], item_id: str, **changes: Any) -> dict[str, Any]:
    row = read_items(bundle_paths["data"]).iloc[0]
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    return {**out, "item_id": item_id, "available": True, **changes}


def timed(fn: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


@pytest.fixture
def redis_up(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path / "redis")
    yield r
    r.close()


# ---- a hung Redis (SIGSTOP), a dead one (SIGKILL), and back ------------------------------------


def test_a_stopped_redis_never_freezes_the_server(
    redis_up: PrivateRedis, bundle_paths, tmp_path: Path, record_property
) -> None:
    cfg = redis_config(bundle_paths, tmp_path, redis_up.url)
    # A 3 s delta log deadline: an item write waits that long on the stopped Redis, long enough to see
    # that /healthz answers meanwhile.
    handle = start_background(dataclasses.replace(cfg, freshness=dataclasses.replace(cfg.freshness, timeout_ms=3000)))
    http = httpx.Client(base_url=handle.url, timeout=30)
    try:
        assert http.post("/v1/events", json={"user_id": "u1", "item_id": "5"}).status_code == 200
        warm = http.post("/v1/candidates", json={"user_id": "u1", "k": 10}).json()
        assert warm["degraded"] is False

        redis_up.pause()
        # The first request after the stop waits out the read deadline (100 ms), then answers degraded;
        # while the link is marked down (retry_s), requests do not wait on Redis at all.
        first, first_s = timed(lambda: http.post("/v1/candidates", json={"user_id": "u1", "k": 10}))
        assert first.status_code == 200 and first.json()["degraded"] is True, first.text
        assert len(first.json()["candidates"]) == 10
        assert first_s < 1.5, first_s  # deadline 0.1 s; 5 s before the fix (redis-py's socket timeout)
        health = [timed(lambda: http.get("/healthz")) for _ in range(20)]
        assert all(r.status_code == 200 for r, _ in health)
        health_max = max(s for _, s in health)
        assert health_max < 2.0, health_max  # the loop never waits on Redis: 14.5 s before the fix
        later = [timed(lambda: http.post("/v1/candidates", json={"user_id": "u1", "k": 10})) for _ in range(10)]
        assert all(r.status_code == 200 and r.json()["degraded"] for r, _ in later)

        # A click that cannot be stored is refused, never dropped silently.
        click, click_s = timed(lambda: http.post("/v1/events", json={"user_id": "u1", "item_id": "6"}))
        assert click.status_code == 503 and "error" in click.json(), click.text
        # An item write while the delta log's Redis hangs: 503 within its deadline, and meanwhile the
        # loop keeps answering /healthz (the write waits in its own thread).
        got: dict[str, Any] = {}

        def write() -> None:
            got["r"] = http_w.post("/v1/items", json={"items": [item_row(bundle_paths, "990001")]}, headers=AUTH)
            got["at"] = time.perf_counter()

        writer = threading.Thread(target=write)
        with httpx.Client(base_url=handle.url, timeout=30) as http_w:
            time.sleep(0.6)  # let the delta log's own retry window pass, so the write really waits on Redis
            t0 = time.perf_counter()
            writer.start()
            time.sleep(0.2)  # the write is now waiting on the stopped Redis (for up to 3 s)
            during = [timed(lambda: http.get("/healthz")) for _ in range(5)]
            answered_at = time.perf_counter()
            writer.join(timeout=20)
            write_s = got["at"] - t0
        assert got["r"].status_code == 503, got["r"].text
        assert all(r.status_code == 200 for r, _ in during)
        # Order, not speed: /healthz answered while the write still waited (before the fix they queued behind it).
        assert answered_at < got["at"], (answered_at - t0, write_s)
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["degraded"] is True and ready.json()["dependencies"]["features"] == "down"

        redis_up.resume()
        wait_for(lambda: not http.post("/v1/candidates", json={"user_id": "u1", "k": 10}).json()["degraded"])
        wait_for(lambda: http.get("/readyz").json()["dependencies"] == {"features": "up", "delta_log": "up"})
        assert http.post("/v1/events", json={"user_id": "u1", "item_id": "7"}).status_code == 200
        record_property("healthz_max_ms_redis_stopped", round(health_max * 1e3, 2))
        record_property("candidates_first_degraded_ms", round(first_s * 1e3, 1))
        record_property("candidates_degraded_max_ms", round(max(s for _, s in later) * 1e3, 2))
        record_property("click_503_ms", round(click_s * 1e3, 1))
        print(
            f"\nredis stopped: healthz max {health_max * 1e3:.1f} ms, first candidates {first_s * 1e3:.0f} ms, "
            f"later degraded max {max(s for _, s in later) * 1e3:.1f} ms, click 503 in {click_s * 1e3:.0f} ms, "
            f"item write 503 in {write_s * 1e3:.0f} ms, healthz during it max {max(t for _, t in during) * 1e3:.1f} ms"
        )
    finally:
        redis_up.resume()
        http.close()
        handle.stop()


def test_searches_never_wait_for_a_write_stuck_on_the_delta_log(
    redis_up: PrivateRedis, bundle_paths, tmp_path: Path
) -> None:
    """An item write blocked on a hung Redis delta log holds only itself: searches meanwhile answer
    (degraded) long before it gives up; a write after the recovery is searchable on return."""
    cfg = redis_config(bundle_paths, tmp_path, redis_up.url)
    cfg = dataclasses.replace(cfg, freshness=dataclasses.replace(cfg.freshness, timeout_ms=3000))
    handle = start_background(cfg)
    http = httpx.Client(base_url=handle.url, timeout=30)
    try:
        assert (
            http.post("/v1/items", json={"items": [item_row(bundle_paths, "990201")]}, headers=AUTH).status_code == 200
        )
        redis_up.pause()
        done: dict[str, Any] = {}

        def stuck_write() -> None:
            with httpx.Client(base_url=handle.url, timeout=30) as w:
                done["response"] = w.post("/v1/items", json={"items": [item_row(bundle_paths, "990202")]}, headers=AUTH)
            done["at"] = time.perf_counter()

        writer = threading.Thread(target=stuck_write)
        writer.start()
        time.sleep(0.3)  # the write is now waiting on the stopped Redis (for up to 3 s)
        search = http.post("/v1/candidates", json={"user_id": "u1", "k": 10})
        search_at = time.perf_counter()
        writer.join(timeout=20)
        assert search.status_code == 200 and search.json()["degraded"] is True, search.text
        assert done["response"].status_code == 503, done["response"].text
        # Before the fix the search waited at a gate until the write had timed out: both ended together.
        assert done["at"] - search_at > 1.0, done["at"] - search_at

        redis_up.resume()
        wait_for(lambda: http.get("/readyz").json()["dependencies"] == {"features": "up", "delta_log": "up"})
        row = item_row(bundle_paths, "990203", category="fault_new_cat")
        assert http.post("/v1/items", json={"items": [row]}, headers=AUTH).status_code == 200
        got = http.post("/v1/candidates", json={"user_id": "u1", "k": 5, "filter": {"categories": ["fault_new_cat"]}})
        assert [c["item_id"] for c in got.json()["candidates"]] == [990203], got.text
    finally:
        redis_up.resume()
        http.close()
        handle.stop()


def test_a_killed_redis_degrades_then_recovers_on_restart(redis_up: PrivateRedis, bundle_paths, tmp_path: Path) -> None:
    handle = start_background(redis_config(bundle_paths, tmp_path, redis_up.url))
    http = httpx.Client(base_url=handle.url, timeout=30)
    try:
        assert http.post("/v1/events", json={"user_id": "u2", "item_id": "5"}).status_code == 200
        assert (
            http.post("/v1/items", json={"items": [item_row(bundle_paths, "990100")]}, headers=AUTH).status_code == 200
        )
        redis_up.kill()
        c = http.post("/v1/candidates", json={"user_id": "u2", "k": 5})
        assert c.status_code == 200 and c.json()["degraded"] is True
        assert http.post("/v1/events", json={"user_id": "u2", "item_id": "6"}).status_code == 503
        w = http.post("/v1/items", json={"items": [item_row(bundle_paths, "990101")]}, headers=AUTH)
        assert w.status_code == 503 and "error" in w.json(), w.text  # was 500 (redis ConnectionError) before
        p = http.patch("/v1/items/5", json={"available": False}, headers=AUTH)
        assert p.status_code == 503, p.text
        assert http.get("/readyz").json()["dependencies"] == {"features": "down", "delta_log": "down"}

        redis_up.restart()  # same port, same dir: the AOF brings the acknowledged writes back
        wait_for(lambda: not http.post("/v1/candidates", json={"user_id": "u2", "k": 5}).json()["degraded"])
        wait_for(lambda: http.post("/v1/events", json={"user_id": "u2", "item_id": "6"}).status_code == 200)
        wait_for(
            lambda: (
                http.post("/v1/items", json={"items": [item_row(bundle_paths, "990101")]}, headers=AUTH).status_code
                == 200
            )
        )
        session = handle.retriever.store.get_one("u2").session
        assert [e.item_id for e in session][-1] == "5"  # the click from before the kill survived
        assert "990101" in handle.retriever.holder.current().item_internal
    finally:
        http.close()
        handle.stop()


# ---- durability: appendonly, and a SIGKILLed Redis keeps every acknowledged write ---------------


def test_a_redis_without_appendonly_is_refused_unless_allowed(tmp_path: Path, bundle_paths, caplog) -> None:
    volatile = PrivateRedis(tmp_path / "redis", appendonly=False)
    try:
        with pytest.raises(ConfigError, match="appendonly no") as e:
            start_background(redis_config(bundle_paths, tmp_path, volatile.url))
        assert "allow_volatile" in str(e.value) and PASSWORD not in str(e.value)
        with caplog.at_level(logging.WARNING, logger="towerann"):
            handle = start_background(redis_config(bundle_paths, tmp_path, volatile.url, allow_volatile=True))
        try:
            assert httpx.get(f"{handle.url}/readyz").status_code == 200
        finally:
            handle.stop()
        assert any("allow_volatile" in r.getMessage() for r in caplog.records)
    finally:
        volatile.close()


def test_acknowledged_writes_survive_a_sigkill_of_redis(redis_up: PrivateRedis, bundle_paths, tmp_path: Path) -> None:
    handle = start_background(redis_config(bundle_paths, tmp_path, redis_up.url))
    try:
        for i in range(5):
            r = httpx.post(
                f"{handle.url}/v1/items", json={"items": [item_row(bundle_paths, str(991000 + i))]}, headers=AUTH
            )
            assert r.status_code == 200, r.text
        clicks = [str(i) for i in range(20, 32)]
        for item in clicks:
            assert (
                httpx.post(f"{handle.url}/v1/events", json={"user_id": "durable", "item_id": item}).status_code == 200
            )
        assert httpx.patch(f"{handle.url}/v1/items/991000", json={"available": False}, headers=AUTH).status_code == 200
    finally:
        handle.stop()
    redis_up.kill()  # SIGKILL right after the acknowledgements: no shutdown save
    redis_up.restart()
    delta = open_delta_log(redis_up.url)
    try:
        entries = list(delta.since(0))
    finally:
        delta.close()
    assert [(e.op, e.item_id) for e in entries] == [("upsert", str(991000 + i)) for i in range(5)] + [
        ("available", "991000")
    ]
    from towerann.features import open_store

    store = open_store(redis_up.url)
    try:
        assert [e.item_id for e in store.get_one("durable").session] == clicks[::-1]
    finally:
        store.close()


def test_a_redis_that_stops_logging_while_serving_refuses_writes_until_it_logs_again(
    redis_up: PrivateRedis, bundle_paths, tmp_path: Path
) -> None:
    """Durability is read at startup and again every poll_s: `CONFIG SET appendonly no` on the running
    Redis turns item writes and clicks into 503 (they were still acknowledged) and /readyz says why;
    `appendonly yes` and they are taken again."""
    import redis

    cfg = redis_config(bundle_paths, tmp_path, redis_up.url)
    handle = start_background(dataclasses.replace(cfg, freshness=dataclasses.replace(cfg.freshness, poll_s=0.1)))
    admin = redis.Redis.from_url(redis_up.url)
    http = httpx.Client(base_url=handle.url, timeout=30)

    def writes() -> tuple[int, int]:
        item = http.post("/v1/items", json={"items": [item_row(bundle_paths, "990400")]}, headers=AUTH)
        click = http.post("/v1/events", json={"user_id": "u4", "item_id": "5"})
        return item.status_code, click.status_code

    try:
        assert writes() == (200, 200)
        admin.config_set("appendonly", "no")
        wait_for(lambda: writes() == (503, 503))
        ready = http.get("/readyz").json()
        assert ready["degraded"] and ready["dependencies"]["delta_log"] == "not durable", ready
        assert "appendonly no" in ready["durability"]
        assert (
            "no longer logs writes" in http.post("/v1/events", json={"user_id": "u4", "item_id": "6"}).json()["error"]
        )
        admin.config_set("appendonly", "yes")
        wait_for(lambda: writes() == (200, 200))
        ready = http.get("/readyz").json()
        assert not ready["degraded"] and "durability" not in ready, ready
    finally:
        admin.close()
        http.close()
        handle.stop()


# ---- the password of a Redis URL appears nowhere ------------------------------------------------


def test_a_redis_password_never_leaks(redis_up: PrivateRedis, bundle_paths, tmp_path: Path, caplog, capsys) -> None:
    from towerann.cli import main as cli

    caplog.set_level(logging.DEBUG, logger="towerann")
    seen: list[str] = []
    # features load / stats print where they wrote: redacted
    assert (
        cli(["features", "load", "--data", str(bundle_paths["data"]), "--store", redis_up.url, "--prefix", "leak:"])
        == 0
    )
    assert cli(["features", "stats", "--store", redis_up.url, "--prefix", "leak:"]) == 0
    out = capsys.readouterr()
    seen += [out.out, out.err]
    assert "redis://***@127.0.0.1" in out.out

    handle = start_background(redis_config(bundle_paths, tmp_path, redis_up.url))
    try:
        redis_up.kill()
        for _ in range(2):  # the first call meets the dead server, the second the fail-fast path
            for method, path, body in [
                ("POST", "/v1/candidates", {"user_id": "3", "k": 5}),
                ("POST", "/v1/events", {"user_id": "3", "item_id": "5"}),
                ("POST", "/v1/items", {"items": [item_row(bundle_paths, "992000")]}),
                ("PATCH", "/v1/items/5", {"available": False}),
                ("GET", "/readyz", None),
                ("GET", "/metrics", None),
            ]:
                r = httpx.request(method, handle.url + path, json=body, headers=AUTH)
                assert r.status_code < 500 or r.status_code == 503, (path, r.text)
                seen.append(r.text)
            time.sleep(0.6)  # past retry_s: the next round meets the server again
        with pytest.raises(Exception) as stats_error:  # stats of a dead store raise, redacted
            handle.retriever.store.stats()
        seen.append(str(stats_error.value))
    finally:
        handle.stop()
    # startup against the dead Redis: one line on stderr, exit 2
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "towerann.server.commands",
            "serve",
            "--index",
            str(bundle_paths["index"]),
            "--store",
            redis_up.url,
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "redis://***@127.0.0.1" in proc.stderr, proc.stderr
    assert cli(["features", "load", "--data", str(bundle_paths["data"]), "--store", redis_up.url]) == 2
    out = capsys.readouterr()
    seen += [proc.stdout, proc.stderr, out.out, out.err]
    seen += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    seen += [logging.Formatter().formatException(r.exc_info) for r in caplog.records if r.exc_info]
    leaks = [text for text in seen if PASSWORD in text]
    assert not leaks, leaks[:3]
    assert any("cannot reach Redis at redis://***@" in text for text in seen)


# ---- a poisoned delta log stops nothing ----------------------------------------------------------


def own_root(tmp_path: Path, bundle_paths: dict[str, Path]) -> Config:
    from towerann.freshness.publish import publish_bundle

    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    (tmp_path / "token").write_text(TOKEN)
    return Config(
        serve=ServeConfig(max_k=1000),
        paths=PathsConfig(index=str(root), model=str(bundle_paths["model"]), data=str(bundle_paths["data"])),
        features=FeaturesConfig(store="memory", path=""),
        freshness=FreshnessConfig(
            adopt_log=True,
            delta_path=str(tmp_path / "delta.sqlite"),
            token_file=str(tmp_path / "token"),
            poll_s=0.0,
            min_recall=0.5,
        ),
    )


def test_a_bad_upsert_in_the_log_stops_neither_startup_nor_a_reload(tmp_path: Path, bundle_paths) -> None:
    from towerann.freshness.publish import publish_bundle

    cfg = own_root(tmp_path, bundle_paths)
    delta = open_delta_log("embedded", cfg.freshness.delta_path)
    bad = item_row(bundle_paths, "993000", price=1e300)  # the item tower makes NaN of it
    good = item_row(bundle_paths, "993001")
    delta.append("upsert", "993000", bad)  # as an older server, before the fix, logged it
    delta.append("upsert", "993001", good)
    delta.close()
    handle = start_background(cfg)  # replays the log: the bad entry is skipped and logged
    try:
        assert httpx.get(f"{handle.url}/readyz").status_code == 200
        b = handle.retriever.holder.current()
        assert "993001" in b.item_internal and "993000" not in b.item_internal
        publish_bundle(cfg.paths.index, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
        r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
        assert handle.retriever.holder.current().version != b.version
        assert "993001" in handle.retriever.holder.current().item_internal
    finally:
        handle.stop()


# ---- corrupted artifacts at startup: one line, exit 2 --------------------------------------------


def test_a_corrupted_manifest_at_startup_is_one_line_and_exit_2(tmp_path: Path, bundle_paths) -> None:
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    version = (root / "CURRENT").read_text().strip()
    manifest = root / version / "manifest.json"
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: no longer UTF-8
    manifest.write_bytes(bytes(data))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "towerann.server.commands",
            "serve",
            "--index",
            str(root),
            "--store",
            "memory",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "manifest.json" in proc.stderr and "corrupted" in proc.stderr  # names the file and what is wrong


def test_a_garbage_onnx_user_tower_is_an_artifact_error(tmp_path: Path, bundle_paths) -> None:
    from towerann.errors import ArtifactError
    from towerann.model.export import UserEncoder
    from towerann.model.model import TwoTowerModel

    model = TwoTowerModel.load(bundle_paths["model"])
    (tmp_path / "user_tower.onnx").write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ArtifactError, match="not a loadable ONNX user tower"):
        UserEncoder(model, tmp_path)
    with pytest.raises(ArtifactError, match="not a loadable ONNX"):
        UserEncoder(model, tmp_path / "missing")

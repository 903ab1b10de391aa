"""The server's log, read the way an operator reads it: the lines our handler writes (server.logs, text and
JSON), from real servers. One access line per request (route template, status, k, flags), one line per
state change (a swap, a refused bundle, degraded on and off), no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from ann_catalog import AUTH, TOKEN, server_config
from test_faults import AUTH as REDIS_AUTH
from test_faults import PASSWORD, PrivateRedis, redis_config
from test_faults import TOKEN as REDIS_TOKEN

from towerann.freshness.publish import publish_bundle
from towerann.index.snapshot import set_current
from towerann.server.logs import JsonFormatter, log_handler
from towerann.server.server import ServerHandle, start_background


class Lines:
    """What the server's handlers wrote, in both formats, for the records of the `towerann` loggers."""

    def __init__(self) -> None:
        self.text, self.json = io.StringIO(), io.StringIO()

    def text_lines(self) -> list[str]:
        return self.text.getvalue().splitlines()

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.json.getvalue().splitlines()]  # every line is one JSON object

    def access(self) -> list[dict[str, Any]]:
        return [o for o in self.objects() if o["logger"] == "towerann.access"]

    def matching(self, needle: str) -> list[str]:
        return [line for line in self.text_lines() if needle in line]


@contextmanager
def server_log() -> Iterator[Lines]:
    """The towerann loggers at INFO, written by the server's own handlers (redacting filter included)."""
    lines = Lines()
    handlers = [log_handler("text", stream=lines.text), log_handler("json", stream=lines.json)]
    towerann = logging.getLogger("towerann")
    before = towerann.level
    for h in handlers:
        towerann.addHandler(h)
    towerann.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        for h in handlers:
            towerann.removeHandler(h)
        towerann.setLevel(before)


def eventually(probe: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def settle(url: str, lines: Lines) -> None:
    """Wait until the line of one last request (GET /healthz?settle) is written: every earlier one is too."""
    before = sum(o["route"] == "/healthz" for o in lines.access())
    httpx.get(f"{url}/healthz").raise_for_status()
    eventually(lambda: sum(o["route"] == "/healthz" for o in lines.access()) > before, "the settling line")


# ---- the access log -----------------------------------------------------------------------------


def test_every_request_leaves_one_access_line_with_route_status_and_k(server: ServerHandle) -> None:
    with server_log() as lines, httpx.Client(base_url=server.url) as http:
        for k in (1, 5, 10, 20, 50):
            assert http.post("/v1/candidates", json={"user_id": "1", "k": k}).status_code == 200
        assert http.post("/v1/candidates", json={"user_id": "1", "k": 0}).status_code == 400  # k out of range
        assert http.post("/v1/candidates", json={"user_id": "1"}).status_code == 422  # k missing
        assert (
            http.post("/v1/candidates", content=b"{not json", headers={"content-type": "application/json"}).status_code
            == 400
        )
        assert http.get("/v1/nowhere").status_code == 404
        assert http.patch("/v1/items/item-77", json={"available": False}).status_code == 403  # no token configured
        assert http.post("/v1/events", json={"user_id": "1", "item_id": "no-such-item"}).status_code == 404
        assert http.get("/metrics").status_code == 200
        settle(server.url, lines)

    access = lines.access()[:-1]  # the settling request's own line last
    assert [(o["method"], o["route"], o["status"]) for o in access] == [
        *[("POST", "/v1/candidates", 200)] * 5,
        ("POST", "/v1/candidates", 400),
        ("POST", "/v1/candidates", 422),
        ("POST", "/v1/candidates", 400),
        ("GET", "other", 404),
        ("PATCH", "/v1/items/{item_id}", 403),
        ("POST", "/v1/events", 404),
        ("GET", "/metrics", 200),
    ]
    assert [o["k"] for o in access[:6]] == [1, 5, 10, 20, 50, 0]
    assert "k" not in access[6] and all("k" not in o for o in access[7:])
    assert all(isinstance(o["ms"], float) and o["ms"] >= 0 and o["level"] == "INFO" for o in access)
    assert not any(o.get("degraded") or o.get("partial") for o in access)
    # the text lines say the same, one per request; the path's ids and the user ids appear nowhere
    text = lines.matching("towerann.access: ")
    assert len(text) == len(access) + 1
    assert re.search(r"towerann\.access: POST /v1/candidates 200 \d+\.\d\dms k=20$", text[3]), text[3]
    assert re.search(r"towerann\.access: POST /v1/candidates 400 \d+\.\d\dms k=0$", text[5]), text[5]
    assert all("item-77" not in line and "no-such-item" not in line for line in text)


def test_secrets_and_ids_never_reach_a_line(server: ServerHandle) -> None:
    with server_log() as lines:
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": TOKEN}
        httpx.delete(f"{server.url}/v1/items/{TOKEN}", headers=headers)
        httpx.get(f"{server.url}/metrics", params={"token": TOKEN, "url": f"redis://:{PASSWORD}@host:1/0"})
        httpx.post(f"{server.url}/v1/candidates", json={"user_id": TOKEN, "k": 3}, headers=headers)
        settle(server.url, lines)
    everything = lines.text.getvalue() + lines.json.getvalue()
    assert lines.access() and TOKEN not in everything and PASSWORD not in everything


def test_the_access_log_off_writes_nothing(server: ServerHandle) -> None:
    with server_log() as lines:
        logging.getLogger("towerann.access").setLevel(logging.WARNING)
        try:
            for _ in range(3):
                httpx.post(f"{server.url}/v1/candidates", json={"user_id": "1", "k": 5}).raise_for_status()
        finally:
            logging.getLogger("towerann.access").setLevel(logging.NOTSET)
        settle(server.url, lines)
    assert [o["route"] for o in lines.access()] == ["/healthz"]


def test_json_lines_carry_the_extra_fields_and_stay_one_line() -> None:
    record = logging.LogRecord("towerann.freshness.reload", logging.ERROR, __file__, 1, "bad\nbundle %s", ("v2",), None)
    record.__dict__.update(event="bundle_refused", reason=f"redis://:{PASSWORD}@host:6379/0 said no")
    out = JsonFormatter(worker="1").format(record)
    assert "\n" not in out
    got = json.loads(out)
    assert got["msg"] == "bad\nbundle v2" and got["level"] == "ERROR" and got["worker"] == "1"
    assert got["event"] == "bundle_refused" and PASSWORD not in got["reason"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got["ts"])


# ---- state changes: one line each ---------------------------------------------------------------


def reload_server(tmp_path: Path, bundle_paths: dict[str, Path]) -> tuple[ServerHandle, Path]:
    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    return start_background(server_config(tmp_path, root, bundle_paths, poll_s=0.05)), root


def test_a_swap_and_a_refused_bundle_leave_one_line_each(tmp_path: Path, bundle_paths: dict[str, Path]) -> None:
    with server_log() as lines:
        handle, root = reload_server(tmp_path, bundle_paths)
        try:
            first = handle.retriever.holder.current().version
            shutil.copytree(root / first, root / "v-second")
            set_current(root, "v-second")
            eventually(lambda: handle.retriever.holder.current().version == "v-second", "the watcher's swap")
            assert handle.service is not None and handle.service.reloader is not None
            for _ in range(3):  # the watcher polls on; the admin route finds nothing new
                assert handle.service.reloader.check() is None
                assert httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH).json()["outcome"] == "unchanged"

            shutil.copytree(root / "v-second", root / "v-bad")
            ids = root / "v-bad" / "external_ids.npy"
            ids.write_bytes(ids.read_bytes()[:-16] + b"\0" * 16)  # the checksum no longer matches
            set_current(root, "v-bad")
            eventually(lambda: lines.matching("bundle refused"), "the watcher's refusal")
            for _ in range(3):  # remembered: the watcher does not try it again
                assert handle.service.reloader.check() is None
            settle(handle.url, lines)  # (meanwhile the watcher polled on, every 50 ms)
            assert len(lines.matching("bundle refused")) == 1
            r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH)  # asked again: refused again, said again
            assert r.status_code == 409
            settle(handle.url, lines)
        finally:
            handle.stop()

    swapped = lines.matching("bundle swapped")
    assert len(swapped) == 1, swapped
    assert f"bundle swapped: {first} -> v-second (CURRENT names v-second;" in swapped[0]
    refused = lines.matching("bundle refused")
    assert len(refused) == 2, refused  # the watcher's, then the admin route's
    assert "v-bad" in refused[0] and "CURRENT names v-bad" in refused[0] and "still serving v-second" in refused[0]
    assert "POST /v1/admin/reload" in refused[1] and "checksum" in refused[1].lower()
    events = [o for o in lines.objects() if "event" in o]
    assert [o["event"] for o in events] == ["bundle_swapped", "bundle_refused", "bundle_refused"]
    assert events[0]["from_version"] == first and events[0]["to_version"] == "v-second"


def test_a_redis_outage_is_one_degraded_on_and_one_degraded_off(tmp_path: Path, bundle_paths: dict[str, Path]) -> None:
    redis = PrivateRedis(tmp_path / "redis")  # with a password, which no line may show
    try:
        with server_log() as lines:
            handle = start_background(redis_config(bundle_paths, tmp_path, redis.url))
            http = httpx.Client(base_url=handle.url, timeout=30)
            try:
                ask = lambda: http.post("/v1/candidates", json={"user_id": "u1", "k": 5}).json()  # noqa: E731
                assert [ask()["degraded"] for _ in range(3)] == [False] * 3
                redis.kill()
                assert [ask()["degraded"] for _ in range(5)] == [True] * 5
                time.sleep(0.6)  # past retry_s: the next request meets the dead server again, still degraded
                assert [ask()["degraded"] for _ in range(3)] == [True] * 3
                assert http.patch("/v1/items/5", json={"available": False}, headers=REDIS_AUTH).status_code == 503
                redis.restart()
                eventually(lambda: not ask()["degraded"], "answers with features again")
                assert [ask()["degraded"] for _ in range(3)] == [False] * 3
                settle(handle.url, lines)
            finally:
                http.close()
                handle.stop()
    finally:
        redis.close()
    on, off = lines.matching("degraded on:"), lines.matching("degraded off:")
    assert len(on) == 1 and len(off) == 1, (on, off)
    assert "WARNING towerann.serving.retriever" in on[0] and "INFO towerann.serving.retriever" in off[0]
    assert [o["event"] for o in lines.objects() if o.get("event", "").startswith("degraded")] == [
        "degraded_on",
        "degraded_off",
    ]
    degraded_access = [o for o in lines.access() if o.get("degraded")]
    assert len(degraded_access) >= 8 and all(o["route"] == "/v1/candidates" for o in degraded_access)
    everything = lines.text.getvalue() + lines.json.getvalue()
    assert PASSWORD not in everything and REDIS_TOKEN not in everything
    assert "redis://***@127.0.0.1" in everything  # the Redis lines name the server, redacted


# ---- `towerann serve` itself: its INFO lines reach stderr ----------------------------------------


def test_towerann_serve_writes_one_text_line_per_request_to_stderr(tmp_path: Path, bundle_paths) -> None:
    from towerann.server.server import start_subprocess

    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    toml = tmp_path / "serve.toml"
    toml.write_text(f'[paths]\nindex = "{root}"\n[freshness]\nadopt_log = true\n')
    log = tmp_path / "server.log"
    handle = start_subprocess(root, "memory", config=toml, log_file=log, access_log=True)
    try:
        for k in (3, 4, 5):
            httpx.post(f"{handle.url}/v1/candidates", json={"user_id": "2", "k": k}).raise_for_status()
        assert httpx.post(f"{handle.url}/v1/candidates", json={"user_id": "2", "k": 5000}).status_code == 400
        assert httpx.delete(f"{handle.url}/v1/items/3", headers=AUTH).status_code == 403  # no token configured
    finally:
        handle.stop()
    lines = log.read_text().splitlines()
    access = [line.split("towerann.access: ", 1)[1] for line in lines if " INFO towerann.access: " in line]
    access = [line for line in access if not line.startswith("GET /readyz ")]  # start_subprocess's polls
    assert [re.sub(r" \d+\.\d\dms", "", line) for line in access] == [
        "POST /v1/candidates 200 k=3",
        "POST /v1/candidates 200 k=4",
        "POST /v1/candidates 200 k=5",
        "POST /v1/candidates 400 k=5000",
        "DELETE /v1/items/{item_id} 403",
    ]
    assert any(" INFO towerann.server.server: serving " in line for line in lines)
    assert not any("HTTP/1.1" in line for line in lines)  # uvicorn's own access log stays off

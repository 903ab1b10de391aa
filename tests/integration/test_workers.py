"""`towerann serve --workers 2`: a real parent and two worker processes on one loopback port, a
private Redis (store and delta log). What one worker is told, the other must answer with: item
writes (through the delta log), clicks (the Redis store), reloads (CURRENT), and /metrics totals.

Which worker answers a request is the kernel's choice per connection; `on_worker` opens new
connections until the X-Towerann-Worker header names the one it wants."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from towerann.data.dataset import read_items
from towerann.server.server import ServerHandle, free_port, start_subprocess

TOKEN = "workers-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Worker:
    """Requests answered by one worker: a one-connection client, re-opened until that worker holds it
    (the kernel picks which worker accepts a connection); each request goes out right after a
    /healthz on the same connection has shown the worker, so no write lands on the other one."""

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name
        self.client = self._connect()

    def _connect(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, limits=httpx.Limits(max_connections=1))

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for _ in range(400):
            if self.client.get("/healthz").headers.get("x-towerann-worker") == self.name:
                break
            self.client.close()
            self.client = self._connect()
        else:
            raise AssertionError(f"400 connections and worker {self.name} never accepted one")
        r = self.client.request(method, path, **kw)
        assert r.headers.get("x-towerann-worker") == self.name  # the same connection, so the same worker
        return r


def eventually(probe: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """probe() until it returns something true; the deadline only bounds a broken server."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s")


def row(bundle_paths: dict[str, Path], item_id: str, **changes: Any) -> dict[str, Any]:
    first = read_items(bundle_paths["data"]).iloc[0]
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in first.items()}
    return {**out, "item_id": item_id, "available": True, **changes}


def ids_in(worker: Worker, category: str) -> list[str]:
    body = {"user_id": "7", "k": 10, "filter": {"categories": [category]}}
    r = worker.request("POST", "/v1/candidates", json=body)
    assert r.status_code == 200, r.text
    return [str(c["item_id"]) for c in r.json()["candidates"]]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis that logs its writes (the delta log refuses one that does not)."""
    from towerann.server.server import free_port as port_of

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH")
    port, work = port_of(), tmp_path_factory.mktemp("redis-workers")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    eventually(lambda: _pings(redis, url), "redis-server answering PING")
    yield url
    proc.kill()
    proc.wait()


def _pings(redis: Any, url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, bundle_paths: dict[str, Path], redis_url: str
) -> Iterator[tuple[ServerHandle, Path]]:
    work = tmp_path_factory.mktemp("workers")
    root = work / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    toml = work / "serve.toml"
    toml.write_text(
        f'[paths]\nindex = "{root}"\n[features]\nstore = "{redis_url}"\n'
        # adopt_log: the root is a copy of the session's shared one, which other tests bind to Redis logs
        "[freshness]\npoll_s = 0.3\nmin_recall = 0.5\ntail_ms = 200\nadopt_log = true\n"
    )
    handle = start_subprocess(root, redis_url, config=toml, workers=2, env={"TOWERANN_API_TOKEN": TOKEN})
    yield handle, root
    handle.stop()


@pytest.fixture
def w(served) -> Iterator[dict[str, Worker]]:
    workers = {name: Worker(served[0].url, name) for name in ("0", "1")}
    yield workers
    for worker in workers.values():
        worker.client.close()


def test_an_item_written_through_one_worker_is_searchable_on_the_other(w, bundle_paths) -> None:
    """The guarantee: a write acknowledged by one worker is in every search that starts after the
    acknowledgement, on either worker (not only after the next tail, here every 200 ms); writes to one
    item through both workers end the same on both."""
    r = w["0"].request(
        "POST", "/v1/items", json={"items": [row(bundle_paths, "880001", category="w-new")]}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert ids_in(w["0"], "w-new") == ["880001"]  # the writer: at once
    assert ids_in(w["1"], "w-new") == ["880001"]  # the other: in its next search already

    # hidden through worker 1, shown again through worker 0: worker 0 must apply 1's write first
    r = w["1"].request("PATCH", "/v1/items/880001", json={"available": False}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = w["0"].request("PATCH", "/v1/items/880001", json={"available": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    time.sleep(0.3)  # several tail intervals: had worker 1 applied the two writes out of order, it would show now
    assert ids_in(w["0"], "w-new") == ["880001"] and ids_in(w["1"], "w-new") == ["880001"]

    # deleted through worker 1: gone on worker 0 too
    r = w["1"].request("DELETE", "/v1/items/880001", headers=AUTH)
    assert r.status_code == 200, r.text
    assert ids_in(w["0"], "w-new") == []
    # an item worker 1 has just created can be changed through worker 0 at once (its write catches up first)
    assert (
        w["1"]
        .request("POST", "/v1/items", json={"items": [row(bundle_paths, "880002", category="w-two")]}, headers=AUTH)
        .status_code
        == 200
    )
    r = w["0"].request("PATCH", "/v1/items/880002", json={"available": False}, headers=AUTH)
    assert r.status_code == 200, r.text
    # and without any search, the tail brings worker 1 to the log's last seq
    applied_by_1 = lambda: w["1"].request("GET", "/readyz").json()["delta_seq"] == r.json()["seq"]  # noqa: E731
    eventually(applied_by_1, "worker 1 tailing worker 0's write")


def test_a_click_recorded_by_one_worker_counts_on_the_other(w, bundle_paths) -> None:
    user = "workers-click-user"
    body = {"user_id": user, "k": 20}
    cold = w["1"].request("POST", "/v1/candidates", json=body).json()
    item = str(read_items(bundle_paths["data"]).iloc[5]["item_id"])
    r = w["0"].request("POST", "/v1/events", json={"user_id": user, "item_id": item})
    assert r.status_code == 200, r.text
    warm1 = w["1"].request("POST", "/v1/candidates", json=body).json()  # the next request on worker 1
    warm0 = w["0"].request("POST", "/v1/candidates", json=body).json()
    scores = lambda a: [c["score"] for c in a["candidates"]]  # noqa: E731
    assert scores(warm1) != scores(cold)  # the click changed the user tower's input on worker 1
    assert warm1["candidates"] == warm0["candidates"]  # and both workers ranked with the same session


def test_a_reload_through_one_worker_reaches_the_other(served, w, bundle_paths) -> None:
    from towerann.freshness.publish import publish_bundle

    root = served[1]
    assert (
        w["0"]
        .request("POST", "/v1/items", json={"items": [row(bundle_paths, "880003", category="w-r")]}, headers=AUTH)
        .status_code
        == 200
    )
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    new = (root / "CURRENT").read_text().strip()
    r = w["0"].request("POST", "/v1/admin/reload", headers=AUTH)
    # "unchanged": worker 0's own CURRENT watcher was quicker than the request
    assert r.status_code == 200 and r.json()["outcome"] in ("swapped", "unchanged"), r.text
    assert r.json()["index_version"] == new, r.text
    served_by_1 = lambda: w["1"].request("GET", "/readyz").json()["index_version"] == new  # noqa: E731
    eventually(served_by_1, "worker 1 serving the bundle worker 0 reloaded (it polls CURRENT every 0.3 s)", 60)
    # the item written before the rebuild was replayed from the log onto the new bundle, on both
    assert ids_in(w["0"], "w-r") == ["880003"] and ids_in(w["1"], "w-r") == ["880003"]


def _count(worker: Worker) -> float:
    text = worker.request("GET", "/metrics").text
    m = re.search(r'^towerann_http_requests_total\{route="/v1/candidates",status="200"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_add_up_across_workers(served, w) -> None:
    handle, _ = served
    url = handle.url
    before = _count(w["0"])
    assert _count(w["1"]) == before  # one total, whichever worker is asked
    answered_by = [
        httpx.post(url + "/v1/candidates", json={"user_id": "3", "k": 5}).headers["x-towerann-worker"]
        for _ in range(30)
    ]
    assert set(answered_by) == {"0", "1"}, answered_by  # both served some, so the totals had to be added
    for worker in ("0", "1"):  # the count lands just after each answer: wait for it, then it must be exact
        eventually(lambda one=w[worker]: _count(one) >= before + 30, f"the count on worker {worker}")
        assert _count(w[worker]) == before + 30


def test_sigterm_stops_every_worker(served) -> None:
    """Last of the tests on `served`: SIGTERM to the parent stops both workers, and the parent exits 0."""
    handle = served[0]
    pid = handle.process.pid
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    workers = [c for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) == 2, children
    handle.stop()  # SIGTERM to the parent
    assert handle.process.returncode == 0
    assert not [c for c in workers if Path(f"/proc/{c}").exists()], "a worker outlived its parent"


def test_several_workers_on_a_process_local_store_are_refused_in_one_line(bundle_paths) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "towerann.server.commands",
            "serve",
            "--index",
            str(bundle_paths["index"]),
            "--store",
            "memory",
            "--workers",
            "2",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "redis://" in proc.stderr, proc.stderr


def test_a_worker_that_cannot_load_the_bundle_is_one_line_and_exit_2(tmp_path, bundle_paths, redis_url) -> None:
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    version = (root / "CURRENT").read_text().strip()
    (root / version / "manifest.json").write_text("{not json")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "towerann.server.commands",
            "serve",
            "--index",
            str(root),
            "--store",
            redis_url,
            "--workers",
            "2",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "manifest.json" in proc.stderr, proc.stderr


# ---- the shared-log logic, in one process: two writers, two copies of a bundle, one SQLite log -------


def test_two_writers_on_one_sqlite_log_end_the_same(tmp_path, bundle_paths) -> None:
    """What each worker does, on the SQLite log (two connections, as two processes have): a write
    applies the other writer's earlier entries first, catch_up applies the rest, in log order."""
    from towerann.features import open_store
    from towerann.freshness.deltalog import SQLiteDeltaLog
    from towerann.freshness.live import ItemWriter
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    path = tmp_path / "delta.sqlite"
    a, b = (
        ItemWriter(BundleHolder(RetrievalBundle.load(bundle_paths["index"])), SQLiteDeltaLog(path), shared=True)
        for _ in range(2)
    )
    a.upsert([row(bundle_paths, "770001", category="s-new")])
    b.set_available("770001", False)  # b has not seen the item: without its catch-up, 404
    a.set_available("770001", True)  # logged after b's: a applies b's first, then its own
    b.upsert([row(bundle_paths, "770002", category="s-new")])
    assert a.catch_up() == 1 and a.catch_up() == 0 and b.catch_up() == 0  # b wrote last
    for writer in (a, b):
        assert writer.holder.current().delta_seq == writer.delta.last_seq() == 4
        retriever = Retriever(writer.holder, open_store("memory"))
        found = retriever.candidates("7", 10, {"categories": ["s-new"]}).item_ids
        assert sorted(map(str, found)) == ["770001", "770002"]
    a.delete("770001")
    b.catch_up()
    assert not b.holder.current().holds("770001") and b.holder.current().holds("770002")
    for writer in (a, b):
        writer.delta.close()


APPEND_BATCHES = """
import os, sys, time
from towerann.freshness.deltalog import SQLiteDeltaLog
log = SQLiteDeltaLog(sys.argv[1])
open(sys.argv[1] + "." + sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[1] + ".go"):  # both start appending at once
    time.sleep(0.001)
for i in range(1000):
    log.append_many([("available", f"{sys.argv[2]}-{i}-{j}", {"available": True}) for j in range(3)])
    time.sleep(0.001)  # a gap between batches, as between requests: the other process's waiting append gets in
log.close()
"""


def test_the_sqlite_log_takes_two_processes_appending_at_once(tmp_path) -> None:
    """Two processes append batches at once (WAL, BEGIN IMMEDIATE): no entry lost, each batch contiguous."""
    from towerann.freshness.deltalog import SQLiteDeltaLog

    path = str(tmp_path / "delta.sqlite")
    SQLiteDeltaLog(path).close()  # create the table before the race
    procs = [subprocess.Popen([sys.executable, "-c", APPEND_BATCHES, path, tag]) for tag in ("p", "q")]
    deadline = time.monotonic() + 60
    while not all(Path(f"{path}.{tag}.ready").exists() for tag in ("p", "q")):  # both imported and connected
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "an appender did not start"
        time.sleep(0.01)
    Path(path + ".go").touch()
    assert [p.wait(60) for p in procs] == [0, 0]
    log = SQLiteDeltaLog(path)
    entries = list(log.since(0))
    log.close()
    assert len(entries) == 6000 and [e.seq for e in entries] == list(range(1, 6001))
    batches = [{e.item_id.rsplit("-", 1)[0] for e in entries[k : k + 3]} for k in range(0, 6000, 3)]
    assert all(len(batch) == 1 for batch in batches)  # a batch is 3 consecutive seqs of one process's one batch
    owners = [next(iter(batch))[0] for batch in batches]
    assert sum(a != b for a, b in zip(owners, owners[1:])) > 1  # the two really wrote at the same time


def test_each_worker_keeps_and_saves_its_own_reservoir_of_live_queries(
    tmp_path: Path, bundle_paths: dict[str, Path], redis_url: str
) -> None:
    """With --workers 2 each worker samples its own requests into its own reservoir directory, written when
    it is stopped (SIGTERM): what worker 0 answered is in live_queries/worker-0 only, and the same for 1."""
    import numpy as np

    from towerann.index.retune import LIVE_QUERIES, read_live_writer
    from towerann.serving.bundle import RetrievalBundle

    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    shutil.rmtree(root / LIVE_QUERIES, ignore_errors=True)
    # A Redis db of its own: db 0's delta log is bound to the root of an earlier test of this module, and a
    # copy of a session root that was never served gets an id of its own (refused: another root's log).
    own_db = redis_url.rsplit("/", 1)[0] + "/3"
    toml = tmp_path / "serve.toml"
    toml.write_text(
        f'[paths]\nindex = "{root}"\n[features]\nstore = "{own_db}"\n[freshness]\nadopt_log = true\n'
        "[monitor]\nsample = 1.0\nmax_busy = 1.0\nqueue = 1024\nreservoir = 100\nreservoir_save_s = 0\n"
    )
    dim = RetrievalBundle.load(root).index.dim
    handle = start_subprocess(root, own_db, config=toml, workers=2, env={"TOWERANN_API_TOKEN": TOKEN})
    rng = np.random.default_rng(2)
    sent: dict[str, np.ndarray] = {}
    try:
        workers = {name: Worker(handle.url, name) for name in ("0", "1")}
        for name, worker in workers.items():
            sent[name] = rng.normal(size=(5, dim)).astype(np.float32)
            for v in sent[name]:
                r = worker.request("POST", "/v1/candidates", json={"query_vector": v.tolist(), "k": 4})
                assert r.status_code == 200, r.text
        for name, worker in workers.items():  # the monitor scores its samples in the background
            eventually(
                lambda worker=worker: worker.request("GET", "/readyz").json()["recall"]["live_queries"] >= 5,
                f"worker {name} sampled its queries",
            )
            worker.client.close()
    finally:
        handle.stop()
    for name, others in (("0", "1"), ("1", "0")):
        _, vectors, _ = read_live_writer(root / LIVE_QUERIES / f"worker-{name}")
        assert all((vectors == v).all(axis=1).any() for v in sent[name]), name
        assert not any((vectors == v).all(axis=1).any() for v in sent[others]), name

"""The reservoir of live queries on a real `towerann serve` process: requests name users, the reservoir
keeps their query vectors (the user tower's outputs), k and filters, and no user id anywhere (every byte
of its files and of the server's log is searched for them); a clean stop writes it under the root, and a
restart reads it back and keeps adding to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np

from towerann.index.retune import LIVE_QUERIES, RECORD_KEYS, read_live_writer
from towerann.server.server import ServerHandle, start_subprocess
from towerann.serving.bundle import RetrievalBundle

USER = "secret-user-4f1c-"  # every user id of this test starts with it


def ask(handle: ServerHandle, users: range, category: str | None = None) -> None:
    with httpx.Client(base_url=handle.url, timeout=30) as http:
        for u in users:
            body: dict = {"user_id": f"{USER}{u}", "k": 7}
            if category is not None and u % 2:
                body["filter"] = {"categories": [category]}
            r = http.post("/v1/candidates", json=body)
            assert r.status_code == 200, r.text


def ask_vectors(handle: ServerHandle, vectors: np.ndarray) -> None:
    with httpx.Client(base_url=handle.url, timeout=30) as http:
        for v in vectors:
            r = http.post("/v1/candidates", json={"query_vector": [float(x) for x in v], "k": 7})
            assert r.status_code == 200, r.text


def test_the_reservoir_holds_no_user_id_and_survives_a_restart(bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    shutil.rmtree(root / LIVE_QUERIES, ignore_errors=True)
    toml = tmp_path / "serve.toml"
    toml.write_text(
        f'[paths]\nindex = "{root}"\n'
        "[freshness]\nadopt_log = true\n"  # the copied shared root may have been served with another log
        "[monitor]\nsample = 1.0\nmax_busy = 1.0\nqueue = 1024\nreservoir = 100\nreservoir_save_s = 0\n"
    )
    bundle = RetrievalBundle.load(root)
    category = bundle.category_names[3]
    log = tmp_path / "server.log"

    def serve() -> ServerHandle:
        return start_subprocess(
            root, "embedded", str(tmp_path / "f.sqlite"), config=toml, log_file=log, access_log=True
        )

    sent = np.random.default_rng(5).normal(size=(10, bundle.index.dim)).astype(np.float32)
    first = serve()
    try:
        ask(first, range(20), category)
        ask_vectors(first, sent)
    finally:
        first.stop()  # SIGTERM: a clean stop writes the reservoir
    directory = root / LIVE_QUERIES / "main"
    m, vectors, records = read_live_writer(directory)  # checked: manifest, checksums, shapes
    assert m["model_version"] == bundle.model_version and len(vectors) == 30 == m["count"]
    # the query vectors themselves: the ones sent, and for the users the user tower's output (none of them
    # has features or a session here, so each took the cold path: one vector for all 20)
    assert all((vectors == v).all(axis=1).sum() == 1 for v in sent)
    cold = bundle.encoder.encode(f"{USER}0", {}, [])
    users = [v for v in vectors if not (sent == v).all(axis=1).any()]
    assert len(users) == 20 and np.abs(np.stack(users) - cold).max() < 1e-5
    assert all(set(r) == RECORD_KEYS and r["k"] == 7 for r in records)
    assert sorted(json.dumps(r["filter"]) for r in records) == sorted(
        ["null"] * 20 + [json.dumps({"categories": [category]})] * 10
    )
    for path in [*directory.iterdir(), log]:  # no user id in any file the server wrote, nor in its log
        assert USER.encode() not in path.read_bytes(), path

    second = serve()
    try:
        ready = httpx.get(f"{second.url}/readyz").json()
        assert ready["recall"]["live_queries"] == 30  # read back on start
        ask(second, range(100, 110))
    finally:
        second.stop()
    m, vectors, records = read_live_writer(directory)
    assert len(vectors) == 40 and m["seen"] == 40  # the first run's 30 and the second's 10
    assert all(set(r) == RECORD_KEYS for r in records)
    assert USER.encode() not in log.read_bytes() and not any(
        USER.encode() in p.read_bytes() for p in directory.iterdir()
    )

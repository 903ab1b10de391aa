"""The gRPC transport (`towerann serve --grpc-port`) against the HTTP API of the same real server process on
loopback: the same answers (ids and scores equal), the same errors (the HTTP status's gRPC code, HTTP's
message word for word), the same auth (a token never echoed), the same limits, counted in /metrics; a
degraded answer when Redis is down (two workers sharing the gRPC port), a partial one when a Ray shard is
killed; the generated stub in towerann.client (GrpcClient) returns what the HTTP Client returns."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from test_faults import PASSWORD, PrivateRedis

from towerann.client import Client, GrpcClient
from towerann.client import towerann_v1_pb2 as pb
from towerann.client import towerann_v1_pb2_grpc as pb_grpc
from towerann.data.vectors_dir import read_vectors
from towerann.errors import ArtifactError, BackendUnavailable, BadRequest, NotFound, Unauthorized
from towerann.freshness.publish import publish_bundle
from towerann.index.snapshot import current_version, set_current
from towerann.server.server import ServerHandle, free_port, start_subprocess

TOKEN = "grpc-token-5b7e-secret"
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}


class Served:
    def __init__(self, handle: ServerHandle, grpc_port: int, log: Path, root: Path):
        self.handle, self.url, self.log, self.root = handle, handle.url, log, root
        self.target = f"127.0.0.1:{grpc_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.RetrievalStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.handle.stop()


def serve(
    root: Path,
    store: str,
    tmp: Path,
    toml: str = "",
    workers: int = 1,
    token: str | None = TOKEN,
    extra: tuple[str, ...] = (),
    **kw: Any,
) -> Served:
    """`towerann serve --grpc-port` on `root` in a subprocess (its log in tmp/server.log, access lines on)."""
    grpc_port, log = free_port(), tmp / "server.log"
    config = tmp / "serve.toml"
    config.write_text(toml)
    handle = start_subprocess(
        root,
        store,
        config=config,
        workers=workers,
        env={"TOWERANN_API_TOKEN": token} if token else {},
        args=["--grpc-port", str(grpc_port), *extra],
        log_file=log,
        access_log=True,
        **kw,
    )
    return Served(handle, grpc_port, log, root)


@pytest.fixture(scope="module")
def served(bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The HTTP tests' limits (max_k 200, 1 KiB bodies: tests/integration/conftest.py `server`), a token,
    a memory store; a bundle root of its own (its delta log beside it)."""
    tmp = tmp_path_factory.mktemp("grpc")
    publish_bundle(tmp / "indexes", bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    s = serve(tmp / "indexes", "memory", tmp, "[serve]\nmax_body_bytes = 1024\n", max_k=200)
    yield s
    s.close()


def proto_candidates(body: dict[str, Any]) -> pb.CandidatesRequest:
    """The gRPC request carrying what the JSON body carries (written by hand: not through GrpcClient)."""
    req = pb.CandidatesRequest()
    user = body.get("user_id")
    if isinstance(user, int):
        req.user_id_int = user
    elif user is not None:
        req.user_id = user
    if body.get("query_vector") is not None:
        req.query_vector.extend(body["query_vector"])
    if "k" in body:
        req.k = body["k"]
    for key, values in (body.get("filter") or {}).items():
        req.filter[key].values.extend(values)
    return req


def proto_event(body: dict[str, Any]) -> pb.EventRequest:
    req = pb.EventRequest()
    for field in ("user_id", "item_id"):
        value = body.get(field)
        if isinstance(value, int):
            setattr(req, f"{field}_int", value)
        elif value is not None:
            setattr(req, field, value)
    if "type" in body:
        req.type = body["type"]
    if "ts" in body:
        req.ts = body["ts"]
    return req


def rpc_error(call: Any, request: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=30, **kw)
    return raised.value


def assert_same_error(http: httpx.Response, err: grpc.RpcError) -> None:
    assert http.status_code >= 400, http.text
    assert (err.code(), err.details()) == (CODES[http.status_code], http.json()["error"]), (http.text, err)


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- answers ---------------------------------------------------------------------------------------


def test_grpc_answers_what_http_answers(served: Served, bundle_paths: dict[str, Path]) -> None:
    b = read_vectors(bundle_paths["vectors"])
    query = b.vectors[7].tolist()
    requests = [
        {"user_id": "7", "k": 20},
        {"user_id": 42, "k": 200},  # an integer id, and max_k
        {"user_id": "12", "k": 25, "filter": {"categories": ["cat_0001", "cat_0002"]}},
        {"user_id": "never-seen-user", "k": 1},
        {"query_vector": query, "k": 50},
        {"query_vector": query, "k": 30, "filter": {"categories": ["cat_0003"]}},
    ]
    for body in requests:
        http = httpx.post(f"{served.url}/v1/candidates", json=body)
        assert http.status_code == 200, http.text
        want = http.json()
        got = served.stub.Candidates(proto_candidates(body), timeout=30)
        ids = list(got.item_ids_int)
        assert not got.item_ids_str and ids == [c["item_id"] for c in want["candidates"]], body
        assert len(ids) == body["k"]
        # float32 scores: the JSON answer spells each exactly, so they are equal, not close
        assert list(got.scores) == [c["score"] for c in want["candidates"]], body
        assert (got.model_version, got.index_version, got.degraded) == (
            want["model_version"],
            want["index_version"],
            False,
        )
        assert not got.partial and not got.missing_shards and "partial" not in want
        assert set(got.timings_ms) == set(want["timings_ms"]) == {"features", "user_tower", "ann", "total"}


def test_the_grpc_client_returns_what_the_http_client_returns(served: Served) -> None:
    with Client(served.url) as http, GrpcClient(served.target) as rpc:
        for kwargs in (
            {"user_id": "3", "k": 40},
            {"user_id": 3, "k": 10, "categories": ["cat_0001"]},
            {"user_id": "5", "k": 15, "filter": {"categories": ["cat_0002", "cat_0004"]}},
        ):
            a, b = http.candidates(**kwargs), rpc.candidates(**kwargs)
            assert isinstance(b.item_ids[0], int)  # ids as the catalog has them
            assert (b.item_ids, b.scores, b.model_version, b.index_version, b.degraded, b.missing_shards) == (
                a.item_ids,
                a.scores,
                a.model_version,
                a.index_version,
                a.degraded,
                a.missing_shards,
            )
            assert not b.partial
        assert rpc.health() == {"status": "ok"}
        ready_http, ready_rpc = http.ready(), rpc.ready()
        assert ready_rpc["status"] == "ready" and ready_rpc["items"] == 2000
        drop = ("recall",)  # the monitor's live counts move between the two calls
        assert {k: v for k, v in ready_rpc.items() if k not in drop} == {
            k: v for k, v in ready_http.items() if k not in drop
        }
        typed = served.stub.Ready(pb.ReadyRequest(), timeout=30)
        assert typed.index_version == ready_http["index_version"] and dict(typed.dependencies) == {
            "features": "up",
            "delta_log": "up",
        }
        # a click over gRPC moves the next answer, over either transport, as one over HTTP does
        before = http.candidates("click-user", k=10)
        items = before.item_ids[-3:]
        for item in items:
            got = rpc.event("click-user", item)
            assert (got["user_id"], got["item_id"], got["type"]) == ("click-user", str(item), "click")
            assert got["ts"] > time.time() - 60
        after_http, after_rpc = http.candidates("click-user", k=10), rpc.candidates("click-user", k=10)
        assert after_http.item_ids == after_rpc.item_ids != before.item_ids


# ---- errors ----------------------------------------------------------------------------------------

NAN_QUERY = [math.nan] * 32


@pytest.mark.parametrize(
    "body",
    [
        {"k": 5},  # neither user_id nor query_vector
        {"user_id": "3"},  # no k: 422
        {"user_id": "3", "k": 0},
        {"user_id": "3", "k": -4},
        {"user_id": "3", "k": 201},
        {"user_id": "3", "k": 10**12},
        {"user_id": "", "k": 5},  # 422
        {"user_id": "u" * 300, "k": 5},  # over max_id_length: 422
        {"user_id": "3", "k": 5, "filter": {"categories": ["nope"]}},
        {"user_id": "3", "k": 5, "filter": {"colour": ["red"]}},  # not a filter of this bundle
        {"user_id": "3", "k": 5, "filter": {"categories": []}},
        {"user_id": "3", "k": 5, "filter": {"categories": [""]}},  # 422
        {"query_vector": [1.0, 2.0, 3.0], "k": 5},  # the wrong dim
        {"query_vector": NAN_QUERY, "k": 5},
        {"user_id": "3", "query_vector": [0.0] * 32, "k": 5},  # both
    ],
)
def test_bad_candidates_get_the_http_error(served: Served, body: dict[str, Any]) -> None:
    http = httpx.post(
        f"{served.url}/v1/candidates", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert_same_error(http, rpc_error(served.stub.Candidates, proto_candidates(body)))


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "3", "item_id": "no-such-item"},  # 404
        {"user_id": "3", "item_id": 9_000_000_000},  # an integer id not in the catalog: 404
        {"user_id": "3"},  # 422
        {"user_id": "3", "item_id": "5", "ts": -1.0},  # outside the session window
        {"user_id": "3", "item_id": "5", "type": ""},  # 422
        {"user_id": "3", "item_id": "5", "type": "t" * 300},  # 422
    ],
)
def test_bad_events_get_the_http_error(served: Served, body: dict[str, Any]) -> None:
    http = httpx.post(f"{served.url}/v1/events", json=body)
    assert_same_error(http, rpc_error(served.stub.Event, proto_event(body)))


def test_bad_bytes_and_oversized_messages_are_refused_and_the_server_keeps_serving(served: Served) -> None:
    raw = served.channel.unary_unary(
        "/towerann.v1.Retrieval/Candidates",
        request_serializer=None,  # bytes as they are
        response_deserializer=pb.CandidatesResponse.FromString,
    )
    before = httpx.get(f"{served.url}/metrics").text
    # a user_id that is not UTF-8 (protobuf refuses it while decoding), and bytes that are no message at all
    for data in (b"\x0a\x02\xff\xfe\x20\x05", b"\xff\xff\xff\xff"):
        err = rpc_error(raw, data)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("request is not a valid towerann.v1.CandidatesRequest message ("), err
    # over [serve] max_body_bytes (1 KiB here): HTTP's 413, word for word
    big = {"query_vector": [0.5] * 300, "k": 5}
    http = httpx.post(f"{served.url}/v1/candidates", json=big)
    assert http.status_code == 413
    assert_same_error(http, rpc_error(served.stub.Candidates, proto_candidates(big)))
    # far over it: gRPC's own limit refuses it before it is read, with the same code
    huge = rpc_error(served.stub.Candidates, proto_candidates({"query_vector": [0.5] * 5000, "k": 5}))
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    unknown = rpc_error(served.channel.unary_unary("/towerann.v1.Retrieval/Nope", request_serializer=None), b"")
    assert unknown.code() == grpc.StatusCode.UNIMPLEMENTED
    good = served.stub.Candidates(proto_candidates({"user_id": "3", "k": 5}), timeout=30)
    assert len(good.item_ids_int) == 5
    after = httpx.get(f"{served.url}/metrics").text
    name = "towerann_grpc_requests_total"
    assert (
        metric(after, name, method="Candidates", code="INVALID_ARGUMENT")
        - metric(before, name, method="Candidates", code="INVALID_ARGUMENT")
        == 2
    )
    assert (
        metric(after, name, method="Candidates", code="RESOURCE_EXHAUSTED")
        - metric(before, name, method="Candidates", code="RESOURCE_EXHAUSTED")
        == 1
    )  # the one over the hard limit never reached the service
    assert 'code="INTERNAL"' not in after


def test_the_client_raises_the_http_clients_exceptions(served: Served) -> None:
    with Client(served.url) as http, GrpcClient(served.target, retries=0) as rpc:
        for kwargs in ({"user_id": "3", "k": 0}, {"user_id": "3", "k": 5, "filter": {"colour": ["red"]}}):
            with pytest.raises(BadRequest) as a:
                http.candidates(**kwargs)
            with pytest.raises(BadRequest) as b:
                rpc.candidates(**kwargs)
            assert str(a.value).split(": ", 1)[1] == str(b.value).split(": ", 1)[1]  # after "<call> -> <status>"
        with pytest.raises(NotFound, match="not in the served catalog"):
            rpc.event("3", "no-such-item")
        with pytest.raises(BadRequest, match="NaN or infinite"):  # refused before it is sent, as by Client
            rpc.candidates(query_vector=[math.inf] * 32, k=5)
        with pytest.raises(BadRequest, match="UTF-8"):
            rpc.candidates("\ud800", k=5)
    with GrpcClient(f"127.0.0.1:{free_port()}", retries=1, timeout_s=1) as down:
        with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
            down.candidates("3", k=5)


# ---- auth ------------------------------------------------------------------------------------------


def test_reload_needs_the_bearer_token_as_over_http_and_never_shows_it(served: Served) -> None:
    wrong = "Bearer " + TOKEN + "x"
    for header in (None, wrong, f"Basic {TOKEN}", TOKEN, "Bearer"):
        headers = {} if header is None else {"authorization": header}
        http = httpx.post(f"{served.url}/v1/admin/reload", headers=headers)
        metadata = () if header is None else (("authorization", header),)
        err = rpc_error(served.stub.Reload, pb.ReloadRequest(), metadata=metadata)
        assert_same_error(http, err)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in err.details()
    for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER   {TOKEN}"):
        got = served.stub.Reload(pb.ReloadRequest(), timeout=60, metadata=(("authorization", header),))
        assert got.outcome == "unchanged" and json.loads(got.body_json)["outcome"] == "unchanged"
    # the read path needs no token, over HTTP or gRPC
    assert len(served.stub.Candidates(proto_candidates({"user_id": "3", "k": 5}), timeout=30).item_ids_int) == 5
    with GrpcClient(served.target, token=TOKEN) as rpc:
        assert rpc.reload()["outcome"] == "unchanged"
    with GrpcClient(served.target, token="not-" + TOKEN, retries=0) as rpc, pytest.raises(Unauthorized) as raised:
        rpc.reload()
    assert TOKEN not in str(raised.value)
    assert TOKEN not in served.log.read_text()  # nor in any log line (access lines included)


def test_a_refused_reload_is_failed_precondition_with_the_http_error(served: Served) -> None:
    """A bundle whose id map fails its checksum: HTTP says 409 with the reason, gRPC FAILED_PRECONDITION
    with the same words (GrpcClient: ArtifactError, as Client); the served bundle keeps serving."""
    serving = current_version(served.root)
    corrupt = served.root / f"{serving}-corrupt"
    shutil.copytree(served.root / serving, corrupt)
    ids = corrupt / "external_ids.npy"
    ids.write_bytes(ids.read_bytes()[:-16] + b"\0" * 16)
    set_current(served.root, corrupt.name)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    try:
        http = httpx.post(f"{served.url}/v1/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert http.status_code == 409 and "checksum" in http.json()["error"].lower(), http.text
        err = rpc_error(served.stub.Reload, pb.ReloadRequest(), metadata=auth)
        assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, http.json()["error"])
        with GrpcClient(served.target, token=TOKEN, retries=0, timeout_s=60) as rpc, pytest.raises(ArtifactError):
            rpc.reload()
        assert served.stub.Ready(pb.ReadyRequest(), timeout=30).index_version == serving
    finally:
        set_current(served.root, serving)
    assert served.stub.Reload(pb.ReloadRequest(), metadata=auth, timeout=60).outcome == "unchanged"


# ---- metrics ---------------------------------------------------------------------------------------


def test_grpc_calls_are_counted_beside_http(served: Served) -> None:
    before = httpx.get(f"{served.url}/metrics").text
    for _ in range(3):
        served.stub.Candidates(proto_candidates({"user_id": "1", "k": 5}), timeout=30)
    rpc_error(served.stub.Candidates, proto_candidates({"user_id": "1", "k": 0}))
    served.stub.Health(pb.HealthRequest(), timeout=30)
    after = httpx.get(f"{served.url}/metrics").text
    name = "towerann_grpc_requests_total"

    def moved(text0: str, text1: str, **labels: str) -> float:
        return metric(text1, name, **labels) - metric(text0, name, **labels)

    assert moved(before, after, method="Candidates", code="OK") == 3
    assert moved(before, after, method="Candidates", code="INVALID_ARGUMENT") == 1
    assert moved(before, after, method="Health", code="OK") == 1
    for stage in ("features", "user_tower", "ann", "total"):  # the server-side stages, as for HTTP requests
        n0 = metric(before, "towerann_stage_seconds_count", stage=stage)
        assert metric(after, "towerann_stage_seconds_count", stage=stage) - n0 == 3
    http = "towerann_http_requests_total"
    assert metric(after, http, route="/v1/candidates", status="200") == metric(
        before, http, route="/v1/candidates", status="200"
    )  # gRPC calls are not HTTP requests
    lines = [line for line in served.log.read_text().splitlines() if "/towerann.v1.Retrieval/Candidates" in line]
    assert any(" 200 " in line and "k=5" in line for line in lines), lines[-5:]


# ---- the command line ------------------------------------------------------------------------------


def test_grpc_port_flags_are_checked(served: Served, bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "towerann.toml"  # the session's shared root was served before with other delta logs
    config.write_text("[freshness]\nadopt_log = true\n")

    def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "towerann.server.commands", "serve", "--index", str(bundle_paths["index"])]
        cmd += ["--config", str(config)]
        return subprocess.run(
            [*cmd, "--store", "memory", "--no-access-log", *args], capture_output=True, text=True, timeout=120
        )

    same = serve_cli("--port", "18123", "--grpc-port", "18123")
    assert same.returncode == 2 and "give gRPC a port of its own" in same.stderr, same.stderr
    bad = serve_cli("--grpc-port", "70000")
    assert bad.returncode == 2 and "grpc_port must be a port number" in bad.stderr, bad.stderr
    taken = int(served.target.rsplit(":", 1)[1])  # the fixture's server holds it
    refused = serve_cli("--port", str(free_port()), "--grpc-port", str(taken))
    assert refused.returncode == 2, refused.stderr
    assert f"cannot listen on 127.0.0.1:{taken} for gRPC" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert served.stub.Health(pb.HealthRequest(), timeout=30).status == "ok"  # the holder kept its port


# ---- degraded: Redis down, two workers sharing the gRPC port ---------------------------------------


def test_degraded_over_grpc_as_over_http_with_two_workers(bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    redis = PrivateRedis(tmp_path / "redis")
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    # adopt_log: the copied root of the session's shared bundle was served before with other delta logs
    toml = "[features]\ntimeout_ms = 100\nretry_s = 0.3\n[freshness]\npoll_s = 0.5\nadopt_log = true\n"
    s = serve(root, redis.url, tmp_path, toml, workers=2, token=None)
    rpc = GrpcClient(s.target, retries=0, timeout_s=30)
    try:
        warm = rpc.candidates("u1", k=10)
        assert not warm.degraded and len(warm.item_ids) == 10
        # a second channel of its own connection: with SO_REUSEPORT the kernel may hand it to either worker;
        # both answer the same
        other = grpc.insecure_channel(s.target, options=[("grpc.use_local_subchannel_pool", 1)])
        stubs = [pb_grpc.RetrievalStub(other), s.stub]
        for stub in stubs:
            assert list(stub.Candidates(proto_candidates({"user_id": "u1", "k": 10}), timeout=30).item_ids_int) == (
                warm.item_ids
            )
        # a server without a token: the admin call is 403 over HTTP, PERMISSION_DENIED over gRPC
        assert_same_error(httpx.post(f"{s.url}/v1/admin/reload"), rpc_error(s.stub.Reload, pb.ReloadRequest()))
        redis.kill()
        deadline = time.monotonic() + 30
        while not httpx.post(f"{s.url}/v1/candidates", json={"user_id": "u1", "k": 10}).json()["degraded"]:
            assert time.monotonic() < deadline, "HTTP never answered degraded"
            time.sleep(0.1)
        http = httpx.post(f"{s.url}/v1/candidates", json={"user_id": "u1", "k": 10}).json()
        for stub in stubs:  # every worker: the store is down for each
            got = stub.Candidates(proto_candidates({"user_id": "u1", "k": 10}), timeout=30)
            assert got.degraded is True and len(got.item_ids_int) == 10
            # without the user's features: the cold-start answer, the same over both transports
            assert list(got.item_ids_int) == [c["item_id"] for c in http["candidates"]]
        assert rpc.candidates("u1", k=10).degraded
        ready = rpc.ready()
        assert ready["degraded"] is True and ready["dependencies"]["features"] == "down"
        click = httpx.post(f"{s.url}/v1/events", json={"user_id": "u1", "item_id": "5"})
        err = rpc_error(s.stub.Event, proto_event({"user_id": "u1", "item_id": "5"}))
        assert click.status_code == 503 and err.code() == grpc.StatusCode.UNAVAILABLE
        assert "not stored" in err.details() or "feature store" in err.details(), err.details()
        assert PASSWORD not in err.details() and PASSWORD not in ready.__repr__()
        redis.restart()
        deadline = time.monotonic() + 30
        while rpc.candidates("u1", k=10).degraded:
            assert time.monotonic() < deadline, "gRPC answers stayed degraded after Redis came back"
            time.sleep(0.1)
        totals = httpx.get(f"{s.url}/metrics").text  # both workers' counts (multiprocess metrics)
        assert metric(totals, "towerann_degraded_answers_total") >= 4
        assert metric(totals, "towerann_grpc_requests_total", method="Candidates", code="OK") >= 6
        other.close()
    finally:
        rpc.close()
        s.close()
        redis.close()
    assert PASSWORD not in s.log.read_text()


# ---- partial: a Ray shard killed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, str]]:
    from ray_cluster import two_nodes

    yield from two_nodes("towerann")


@pytest.mark.slow
def test_partial_over_grpc_as_over_http(
    cluster: tuple[Any, str], bundle_paths: dict[str, Path], tmp_path: Path
) -> None:
    from towerann.index.shard_hash import shard_of
    from towerann.serving.bundle import RetrievalBundle

    ray, address = cluster
    shards, k = 2, 20
    root = tmp_path / "indexes"
    publish_bundle(
        root,
        bundle_paths["model"],
        bundle_paths["vectors"],
        kind="sharded",
        params={"shards": shards, "backend": "exact"},
    )
    local = RetrievalBundle.load(root)
    query = read_vectors(bundle_paths["vectors"]).vectors[0]
    body = {"query_vector": query.tolist(), "k": k}
    s = serve(root, "memory", tmp_path, extra=("--ray", address), timeout_s=180)
    try:
        full = s.stub.Candidates(proto_candidates(body), timeout=30)
        assert not full.partial and len(full.item_ids_int) == k
        victim = 1
        pid = ray.get(ray.get_actor(f"towerann-shard-{victim}").info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        partial = http = None
        deadline = time.monotonic() + 60
        while partial is None and time.monotonic() < deadline:
            got = s.stub.Candidates(proto_candidates(body), timeout=30)
            if got.partial:
                partial = got
                http = httpx.post(f"{s.url}/v1/candidates", json=body, timeout=30).json()
            else:
                time.sleep(0.2)
        assert partial is not None, "no gRPC answer said partial while the shard was down"
        assert list(partial.missing_shards) == [victim]
        left = [local.item_internal.get(str(i)) for i in partial.item_ids_int]
        assert len(left) == k and (shard_of(left, shards) != victim).all()  # the other shard's best, a full k
        if http.get("partial"):  # HTTP asked right after: the same partial answer (unless the shard was back)
            assert http["missing_shards"] == [victim]
            assert [c["item_id"] for c in http["candidates"]] == list(partial.item_ids_int)
        totals = httpx.get(f"{s.url}/metrics").text
        assert metric(totals, "towerann_partial_answers_total") >= 1
        # back by itself: gRPC answers whole again
        deadline = time.monotonic() + 120
        while s.stub.Candidates(proto_candidates(body), timeout=30).partial:
            assert time.monotonic() < deadline, "the shard did not come back"
            time.sleep(0.2)
        assert list(s.stub.Candidates(proto_candidates(body), timeout=30).item_ids_int) == list(full.item_ids_int)
    finally:
        s.close()


# ---- a bound port is the server's own -----------------------------------------------------------------


def test_a_listener_on_the_grpc_port_is_reported_by_the_workers_parent(
    bundle_paths: dict[str, Path], tmp_path: Path
) -> None:
    """--workers 2 binds the gRPC port with SO_REUSEPORT in each worker; a port another socket listens on
    (without SO_REUSEPORT) is one line at start, exit 2, before any worker loads."""
    redis = PrivateRedis(tmp_path / "redis", password=None)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        cmd = [sys.executable, "-m", "towerann.server.commands", "serve", "--index", str(bundle_paths["index"])]
        cmd += ["--store", redis.url, "--workers", "2", "--port", str(free_port()), "--grpc-port", str(taken)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{taken} for gRPC" in done.stderr, done.stderr
    finally:
        holder.close()
        redis.close()


def test_the_generated_modules_are_what_the_proto_generates(tmp_path: Path) -> None:
    """The committed towerann_v1_pb2*.py are tools/gen_grpc.sh's output for the committed .proto."""
    pytest.importorskip("grpc_tools")
    src = Path(__file__).resolve().parents[2] / "src"
    out = tmp_path / "gen"
    out.mkdir()
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(src / "towerann" / "client" / "towerann_v1.proto"),
        ]
    )
    assert rc == 0
    for name in ("towerann_v1_pb2.py", "towerann_v1_pb2.pyi", "towerann_v1_pb2_grpc.py"):
        generated = (out / "towerann" / "client" / name).read_text()
        assert generated == (src / "towerann" / "client" / name).read_text(), f"{name}: run tools/gen_grpc.sh"

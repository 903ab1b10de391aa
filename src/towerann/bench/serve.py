"""`towerann bench serve`: latency per stage and end to end, HTTP server vs the in-process Retriever.

An open-loop load generator (requests are sent on a fixed schedule whatever the server's pace, so
queueing shows up in the latency instead of silently lowering the rate) runs in its own process
with asyncio and many keep-alive HTTP/1.1 connections, against a real uvicorn server on loopback
in another process. It sweeps arrival rates up to saturation and reports p50/p99/p99.9 per stage
(from each response's timings_ms) and end to end, the achieved rate and errors. The same requests
run against the Retriever in-process, so the HTTP overhead is visible. Last, click events are
posted one after another (POST /v1/events: stored before the reply) and their latency reported.

With --grpc the same server also serves gRPC (`serve --grpc-port`), and every rate is offered over both
transports in alternation (who goes first alternates too, so both see the same machine load): the same
requests as towerann.client.GrpcClient builds them, one HTTP/2 connection per generator connection, the
answer's ids and scores as packed arrays instead of K JSON objects.

The workload is built on demand under --workdir: synthetic catalog -> trained model -> item
vectors -> hnsw bundle -> user features loaded into the store. With --index ROOT a published root is served
as it is (e.g. the one `bench pq --set generated|catalog --publish ROOT` writes at 100M items): with
--queries FILE.npy the requests are `query_vector` requests, the rows of FILE, and no click events are
posted; with --data DATASET (a bundle with its model) they are that dataset's users' ids.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.options import add_catalog, add_k, add_kind, add_out, add_recall, add_workdir
from towerann.bench.report import percentiles, write_report
from towerann.config import MonitorConfig
from towerann.errors import ConfigError

log = logging.getLogger(__name__)


# ---- workload ------------------------------------------------------------------------------------


def prepare(
    workdir: str | Path,
    items: int,
    users: int,
    dim: int = 32,
    epochs: int = 2,
    kind: str = "auto",
    seed: int = 0,
    recall: float | None = None,
    k: int = 1000,
    publish: bool = True,
) -> dict[str, Path]:
    """Build (once; reused when present) dataset, model, vectors and a published bundle under workdir.

    recall: tune the index's search parameters to this recall@k on held-out users' queries."""
    from towerann.data.synth import generate
    from towerann.embed.runner import embed_catalog
    from towerann.freshness.publish import publish_bundle
    from towerann.index.build import Tuning
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    work = Path(workdir)
    index_name = "indexes" if recall is None else f"indexes-{kind}-r{recall}@{k}"  # one cached bundle per setting
    paths = {"data": work / "data", "model": work / "model", "vectors": work / "vectors", "index": work / index_name}
    if not (paths["data"] / "manifest.json").exists():
        generate(paths["data"], items, users, seed=seed, overwrite=True)
    if not (paths["model"] / "manifest.json").exists():
        train(
            paths["data"],
            paths["model"],
            TowerConfig(dim=dim),
            TrainConfig(epochs=epochs, seed=seed),
            name="bench",
            overwrite=True,
            progress=False,
        )
    if not (paths["vectors"] / "manifest.json").exists():
        embed_catalog(paths["model"], paths["data"], paths["vectors"])
    if publish and not (paths["index"] / "CURRENT").exists():
        tune = None
        if recall is not None:
            from towerann.model.evaluate import heldout_user_queries
            from towerann.model.model import TwoTowerModel

            queries = heldout_user_queries(TwoTowerModel.load(paths["model"]), paths["data"], 1000, seed)
            tune = Tuning(queries, k, recall)
        publish_bundle(paths["index"], paths["model"], paths["vectors"], kind=kind, tuning=tune)
    return paths


# ---- load generation -----------------------------------------------------------------------------

# One request of a load: a JSON body for POST /v1/candidates, or (path, body) for another POST route.
Request = bytes | tuple[str, bytes]


async def post_json(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str, body: bytes, extra: str = ""
) -> tuple[int, bytes]:
    """One POST of a JSON body over a keep-alive HTTP/1.1 connection (`extra`: header lines, each ending in
    CRLF); returns (status, response body). Raises OSError, IncompleteReadError, ValueError or IndexError
    when the connection or the answer breaks."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    payload = await reader.readexactly(length)
    return int(status_line.split()[1]), payload


async def _open_loop(
    url: str,
    bodies: Sequence[Request],
    rate: float,
    duration_s: float,
    connections: int,
    timeline: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send rate * duration_s requests at fixed arrival times over a pool of keep-alive connections,
    request i being bodies[i % len(bodies)]; headers go with every request (e.g. Authorization).

    timeline: also return each request's send time (unix s), latency (ms) and HTTP status (0 = failed)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    n = max(1, int(rate * duration_s))
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    lat = np.full(n, np.nan)
    codes = np.zeros(n, np.int32)
    degraded = np.zeros(n, bool)  # answered without the user's features (the store was down)
    stages: list[dict[str, float]] = []
    other_ok = 0
    errors: dict[str, int] = {}
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    async def worker() -> None:
        nonlocal other_ok
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                i, t_sched = await queue.get()
                if i < 0:
                    return
                request = bodies[i % len(bodies)]
                path, body = request if isinstance(request, tuple) else ("/v1/candidates", request)
                try:
                    status, payload = await post_json(reader, writer, host, path, body, extra)
                    lat[i] = time.perf_counter() - t_sched  # from the scheduled send: includes queueing
                    codes[i] = status
                    if status != 200:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                    elif path == "/v1/candidates":
                        answer = json.loads(payload)
                        stages.append(answer["timings_ms"])
                        degraded[i] = bool(answer.get("degraded"))
                    else:
                        other_ok += 1
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    t0 = time.perf_counter() + 0.05
    t0_unix = time.time() + 0.05
    for i in range(n):
        t_sched = t0 + i / rate
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((i, t_sched))
    for _ in workers:
        queue.put_nowait((-1, 0.0))
    await asyncio.gather(*workers)
    wall = time.perf_counter() - t0
    done = lat[~np.isnan(lat)]
    out = {
        "target_rps": rate,
        "sent": n,
        "ok": len(stages) + other_ok,
        "errors": errors,
        "achieved_rps": len(done) / wall,
        "end_to_end": percentiles(done),
        "stages": {
            s: percentiles(np.array([t[s] for t in stages]) / 1e3) for s in ("features", "user_tower", "ann", "total")
        }
        if stages
        else {},
    }
    if timeline:
        out["timeline"] = {
            "sent_unix": (t0_unix + np.arange(n) / rate).tolist(),
            "latency_ms": np.where(np.isnan(lat), -1.0, np.round(lat * 1e3, 3)).tolist(),
            "status": codes.tolist(),
            "degraded": degraded.tolist(),
        }
    return out


def _loadgen_main(
    url: str,
    bodies: Sequence[Request],
    rate: float,
    duration_s: float,
    connections: int,
    out: Any,
    timeline: bool = False,
    headers: dict[str, str] | None = None,
) -> None:
    import gc

    gc.disable()  # a collector pause in the generator would show up as server latency
    out.put(asyncio.run(_open_loop(url, bodies, rate, duration_s, connections, timeline, headers)))


def run_load(
    url: str,
    bodies: Sequence[Request],
    rate: float,
    duration_s: float,
    connections: int,
    timeline: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The generator in its own process, so it never competes with the server for the GIL."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loadgen_main, args=(url, bodies, rate, duration_s, connections, q, timeline, headers))
    p.start()
    try:
        return q.get(timeout=duration_s * 4 + 60)
    finally:
        p.join(timeout=10)


async def _open_loop_grpc(
    target: str, requests: Sequence[bytes], rate: float, duration_s: float, connections: int
) -> dict[str, Any]:
    """_open_loop over gRPC: `requests` are serialized towerann.v1.CandidatesRequest messages, sent on the
    same fixed schedule over `connections` channels (each its own HTTP/2 connection, as each HTTP worker
    connection is its own keep-alive connection), one call at a time per connection."""
    from grpc import aio

    from towerann.client import towerann_v1_pb2 as pb

    n = max(1, int(rate * duration_s))
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    lat = np.full(n, np.nan)
    stages: list[dict[str, float]] = []
    errors: dict[str, int] = {}
    method = "/towerann.v1.Retrieval/Candidates"

    async def worker(channel: aio.Channel) -> None:
        call = channel.unary_unary(
            method, request_serializer=None, response_deserializer=pb.CandidatesResponse.FromString
        )
        while True:
            i, t_sched = await queue.get()
            if i < 0:
                return
            try:
                answer = await call(requests[i % len(requests)], timeout=60)
            except aio.AioRpcError as e:  # answered with an error status: timed, as a non-200 over HTTP
                lat[i] = time.perf_counter() - t_sched
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                continue
            lat[i] = time.perf_counter() - t_sched  # from the scheduled send: includes queueing
            stages.append(dict(answer.timings_ms))

    # a local subchannel pool per channel: channels of one target would otherwise share one connection
    channels = [
        aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)
    ]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in channels))
        workers = [asyncio.create_task(worker(c)) for c in channels]
        t0 = time.perf_counter() + 0.05
        for i in range(n):
            t_sched = t0 + i / rate
            delay = t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, t_sched))
        for _ in workers:
            queue.put_nowait((-1, 0.0))
        await asyncio.gather(*workers)
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    done = lat[~np.isnan(lat)]
    return {
        "target_rps": rate,
        "sent": n,
        "ok": len(stages),
        "errors": errors,
        "achieved_rps": len(done) / wall,
        "end_to_end": percentiles(done),
        "stages": {
            s: percentiles(np.array([t[s] for t in stages]) / 1e3) for s in ("features", "user_tower", "ann", "total")
        }
        if stages
        else {},
    }


def _loadgen_grpc_main(
    target: str, requests: Sequence[bytes], rate: float, duration_s: float, connections: int, out: Any
) -> None:
    import gc

    gc.disable()  # as _loadgen_main
    out.put(asyncio.run(_open_loop_grpc(target, requests, rate, duration_s, connections)))


def run_load_grpc(
    target: str, requests: Sequence[bytes], rate: float, duration_s: float, connections: int
) -> dict[str, Any]:
    """The gRPC generator in its own (spawned: no gRPC state forked) process, as run_load."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loadgen_grpc_main, args=(target, requests, rate, duration_s, connections, q))
    p.start()
    try:
        return q.get(timeout=duration_s * 4 + 60)
    finally:
        p.join(timeout=10)


def _event_writes(url: str, user_ids: list[str], item_ids: list[str], n: int) -> dict[str, Any]:
    """POST /v1/events one at a time (a click is stored before the reply): client-side latency."""
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(n + 50):  # the first 50 warm up the connection
            body = {"user_id": user_ids[i % len(user_ids)], "item_id": item_ids[i % len(item_ids)], "type": "click"}
            t = time.perf_counter()
            http.post("/v1/events", json=body).raise_for_status()
            if i >= 50:
                times.append(time.perf_counter() - t)
    return percentiles(times)


def _in_process(
    index_root: Path, store_url: str, store_path: str | None, asks: Sequence[str | np.ndarray], k: int, n: int
) -> dict[str, Any]:
    """The Retriever alone, one request after another: the floor the HTTP server adds to. `asks`: user
    ids, or query vectors (query_vector requests)."""
    from towerann.features import open_store
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    store = open_store(store_url, path=store_path)
    try:
        r = Retriever(BundleHolder(RetrievalBundle.load(index_root)), store)

        def ask(a: str | np.ndarray) -> Any:
            return r.candidates(a, k) if isinstance(a, str) else r.candidates(None, k, query_vector=a.tolist())

        for a in asks[:200]:  # warm-up
            ask(a)
        timings, wall = [], []
        for i in range(n):
            t = time.perf_counter()
            c = ask(asks[i % len(asks)])
            wall.append(time.perf_counter() - t)
            timings.append(c.timings_ms)
        return {
            "requests": n,
            "end_to_end": percentiles(wall),
            "qps_one_thread": n / sum(wall),
            "stages": {s: percentiles(np.array([t[s] for t in timings]) / 1e3) for s in timings[0]},
        }
    finally:
        store.close()


def start_redis(workdir: Path, port: int | None = None, timeout_s: float = 10.0) -> tuple[subprocess.Popen, str]:
    """A private redis-server on loopback (a free port unless given), logging every write
    (appendonly): the server refuses a delta log in a Redis that a crash could empty (everysec: a crash
    of the machine may lose the last second, a crash of Redis nothing). Waits for PING."""
    import redis

    from towerann.server.server import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        raise ConfigError("--store redis needs redis-server on PATH (apt-get install redis-server)")
    port = port or free_port()
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
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with redis.Redis.from_url(url, socket_timeout=0.5) as r:
                if r.ping():
                    return proc, url
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ConfigError(f"redis-server on port {port} did not answer PING within {timeout_s:.0f}s")
        time.sleep(0.05)


QUERY_BODIES = 5000  # distinct requests of a load (cycled)


def _served_root(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """--index ROOT: the root and its current snapshot's manifest, with the options that go with it checked."""
    from towerann.errors import ArtifactError
    from towerann.index.snapshot import resolve

    if (args.queries is None) == (args.data is None):
        raise ConfigError(
            "--index ROOT needs --queries FILE.npy (query vectors, one per row, of the index's dim) or --data "
            "DATASET (its users' ids, through the bundle's own user tower), one of the two"
        )
    if args.grpc:
        raise ConfigError("--grpc goes with the built workload, not with --index")
    root = Path(args.index)
    try:
        manifest = json.loads((resolve(root) / "manifest.json").read_text())
    except (OSError, ValueError, ArtifactError) as e:
        raise ConfigError(f"--index {root}: not a published root or snapshot ({e})") from e
    return root, manifest


def _query_vectors(args: argparse.Namespace, root: Path, manifest: dict[str, Any]) -> np.ndarray:
    """--queries FILE, checked against the served index's dim."""
    from towerann.artifacts import load_npy

    queries = load_npy(args.queries)
    if queries.ndim != 2 or queries.shape[1] != manifest.get("dim") or len(queries) == 0:
        raise ConfigError(
            f"--queries {args.queries}: expected [n, {manifest.get('dim')}] query vectors for {root}, "
            f"got shape {list(queries.shape)}"
        )
    return np.asarray(queries[:QUERY_BODIES], np.float32)


def run(args: argparse.Namespace) -> int:
    from towerann.data.dataset import read_items
    from towerann.features import open_store
    from towerann.features.loader import load_dataset_features

    vectors: np.ndarray | None = None
    users: list[str] | None = None  # --index with --data: these users' ids
    t0 = time.perf_counter()
    if args.index is not None:  # a published root served as it is
        index_root, served = _served_root(args)
        items = int(served.get("count") or 0)
        paths = {"index": index_root}
        if args.data is not None:  # user_id requests through the bundle's own user tower
            from towerann.data.dataset import read_users

            paths["data"] = Path(args.data)
            users = [str(u) for u in read_users(args.data)["user_id"].tolist()]
        else:  # query_vector requests
            vectors = _query_vectors(args, index_root, served)
        # the store of these users' features is kept per root (and per dataset), not per item count
        key = hashlib.sha256(f"{index_root.resolve()} {args.data}".encode()).hexdigest()[:12]
        work = Path(args.workdir) / f"serve-root-{key}"
        work.mkdir(parents=True, exist_ok=True)
    else:
        items = args.items
        work = Path(args.workdir) / f"serve-{args.items}"
        paths = prepare(
            work, args.items, args.users, dim=args.dim, epochs=args.epochs, kind=args.kind, recall=args.recall, k=args.k
        )
    prep_s = time.perf_counter() - t0
    redis_proc = None
    store_url, store_path = args.store, None
    if args.store == "redis":
        redis_proc, store_url = start_redis(work)
    elif args.store == "embedded":
        store_path = str(work / "features.sqlite")
    try:
        user_ids: list[str] = []
        if vectors is None:
            store = open_store(store_url, path=store_path)
            if store.stats().get("users", 0) == 0:
                load_dataset_features(store, paths["data"])
            store.close()
            rng = np.random.default_rng(0)
            if users is None:
                user_ids = [str(u) for u in rng.integers(0, args.users, QUERY_BODIES)]
            else:
                user_ids = [users[i] for i in rng.integers(0, len(users), QUERY_BODIES)]
            bodies = [json.dumps({"user_id": u, "k": args.k}).encode() for u in user_ids]
        else:
            bodies = [json.dumps({"query_vector": v.tolist(), "k": args.k}).encode() for v in vectors]
        grpc_bodies: list[bytes] = []
        if args.grpc:
            from towerann.client.grpc_client import candidates_request

            grpc_bodies = [candidates_request(u, args.k).SerializeToString() for u in user_ids]
        asks: list[Any] = user_ids if vectors is None else list(vectors)
        inproc = _in_process(paths["index"], store_url, store_path, asks, args.k, args.inproc_requests)
        print(
            f"in-process: p50 {inproc['end_to_end']['p50_ms']:.3f} ms, p99 {inproc['end_to_end']['p99_ms']:.3f} ms, "
            f"{inproc['qps_one_thread']:.0f} qps on one thread",
            flush=True,
        )
        compare = args.monitor_sample is not None and args.monitor_sample > 0
        sample = MonitorConfig().sample if args.monitor_sample is None else args.monitor_sample
        grpc_port = None
        if args.grpc:
            from towerann.server.server import free_port

            grpc_port = free_port()
        fresh_log = redis_proc is not None
        server = _start_server(
            work, paths["index"], store_url, store_path, args.workers, sample, grpc_port, fresh_log=fresh_log
        )
        target = f"127.0.0.1:{grpc_port}"
        # --monitor-sample S > 0: a second server with the monitor off takes the same load, rate by rate,
        # in alternation (who goes first alternates too), so both see the same machine load.
        off = (
            _start_server(work, paths["index"], store_url, store_path, args.workers, 0.0, fresh_log=fresh_log)
            if compare
            else None
        )
        rates: list[dict[str, Any]] = []
        rates_off: list[dict[str, Any]] = []
        rates_grpc: list[dict[str, Any]] = []
        try:
            for s in (server, off):
                if s is not None:
                    run_load(s.url, bodies, 100, 5, 8)  # warm-up: fault in the memory-mapped index
            if args.grpc:
                run_load_grpc(target, grpc_bodies, 100, 5, 8)
            for i, rate in enumerate(args.rates):
                runs = [("monitor", server), ("off", off), ("grpc", server if args.grpc else None)]
                for name, s in runs[:: 1 if i % 2 == 0 else -1]:
                    if s is None:
                        continue
                    if name == "grpc":
                        r = run_load_grpc(target, grpc_bodies, rate, args.duration, args.connections)
                        rates_grpc.append(r)
                    else:
                        r = run_load(s.url, bodies, rate, args.duration, args.connections)
                        (rates if name == "monitor" else rates_off).append(r)
                    e = r["end_to_end"]
                    label = "" if off is None else (f" [monitor {sample:g}]" if name == "monitor" else " [monitor off]")
                    if args.grpc:
                        label = " [gRPC]" if name == "grpc" else f"{label} [HTTP]"
                    print(
                        f"rate {rate:>6.0f}/s{label}: achieved {r['achieved_rps']:.0f}/s, p50 {e['p50_ms']:.2f} ms, "
                        f"p99 {e['p99_ms']:.2f} ms, p99.9 {e['p999_ms']:.2f} ms, errors {r['errors']}",
                        flush=True,
                    )
                last = [rates[-1], *rates_grpc[-1:]]
                if all(r["achieved_rps"] < 0.9 * rate or r["end_to_end"]["p99_ms"] > 1000 for r in last):
                    break  # saturated (over every transport measured): higher rates only grow the queue
            monitor = _monitor_report(server.url, sample, rates, rates_off)
            events = None  # a vectors-only root has no users to click
            if vectors is None:
                item_ids = [str(i) for i in read_items(paths["data"], columns=["item_id"])["item_id"].head(1000)]
                events = _event_writes(server.url, user_ids, item_ids, args.events)
                print(
                    f"click events: p50 {events['p50_ms']:.2f} ms, p99 {events['p99_ms']:.2f} ms "
                    "(stored before the reply)",
                    flush=True,
                )
            server_memory = _process_memory(server.process.pid) if server.process is not None else None
        finally:
            server.stop()
            if off is not None:
                off.stop()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)

    def sustained(runs: list[dict[str, Any]]) -> float:
        ok = [r for r in runs if r["achieved_rps"] >= 0.95 * r["target_rps"] and r["end_to_end"]["p99_ms"] < 100]
        return max((r["target_rps"] for r in ok), default=0.0)

    from towerann.index.snapshot import resolve

    served = json.loads((resolve(paths["index"]) / "manifest.json").read_text())
    result = {
        "items": items,
        "users": None if vectors is not None else len(users) if users is not None else args.users,
        "requests": "query_vector" if vectors is not None else "user_id",
        "k": args.k,
        "store": args.store,
        "workers": args.workers,
        "index": {key: served.get(key) for key in ("backend", "build_params", "search_defaults", "tuning")},
        "prepare_seconds": round(prep_s, 1),
        "in_process": inproc,
        "http": rates,
        "http_monitor_off": rates_off,
        "monitor": monitor,
        "event_write": events,
        "server_memory_after_load": server_memory,
        "index_memory": (served.get("backend_state") or {}).get("memory"),
        "raw_vector_bytes": items * int(served.get("dim", 0)) * 4,
        "saturation_rps": max((r["achieved_rps"] for r in rates), default=0.0),
        "max_sustained_rps": sustained(rates),
    }
    if args.index is not None:
        result["index_root"] = str(paths["index"])
        result["queries_file" if vectors is not None else "dataset"] = str(args.queries or args.data)
    if args.grpc:  # the same rates over gRPC, in alternation with HTTP
        result["grpc"] = rates_grpc
        result["grpc_saturation_rps"] = max((r["achieved_rps"] for r in rates_grpc), default=0.0)
        result["grpc_max_sustained_rps"] = sustained(rates_grpc)
    json_path, png_path = write_report(
        args.out,
        f"serve-{items}-k{args.k}-"
        + (f"{args.kind}-" if args.index is None else f"{served.get('backend')}-{'users' if users else 'vectors'}-")
        + args.store.split(":")[0]
        + (f"-w{args.workers}" if args.workers != 1 else ""),
        result,
        _plot(result),
    )
    if args.grpc:
        print(
            f"gRPC: saturation {result['grpc_saturation_rps']:.0f} rps; sustained (p99 < 100 ms) up to "
            f"{result['grpc_max_sustained_rps']:.0f} rps"
        )
    print(
        f"saturation {result['saturation_rps']:.0f} rps; sustained (p99 < 100 ms) up to "
        f"{result['max_sustained_rps']:.0f} rps\nwrote {json_path} and {png_path}"
    )
    return 0


def _start_server(
    work: Path,
    index: Path,
    store_url: str,
    store_path: str | None,
    workers: int,
    sample: float,
    grpc_port: int | None = None,
    fresh_log: bool = False,
) -> Any:
    """`towerann serve` on the bundle with [monitor] sample = `sample` (0: the recall monitor off); with
    `grpc_port`, gRPC beside HTTP on that port. The live re-tune is off: a benchmark measures one setting.
    `fresh_log`: the delta log is in a Redis this run started, so a root served by an earlier run (bound
    to that run's Redis, gone with it) adopts this one instead of refusing to start."""
    from towerann.server.server import start_subprocess

    config = work / f"monitor-{sample:g}.toml"
    adopt = "[freshness]\nadopt_log = true\n" if fresh_log else ""
    config.write_text(f"[monitor]\nsample = {float(sample)!r}\n[retune]\nenabled = false\n{adopt}")
    args = ["--grpc-port", str(grpc_port)] if grpc_port else []
    return start_subprocess(index, store_url, store_path, workers=workers, config=config, args=args)


def _monitor_report(
    url: str, sample: float, rates: list[dict[str, Any]], rates_off: list[dict[str, Any]]
) -> dict[str, Any]:
    """The monitored server's recall gauge, sample count and drops (from /metrics), and per rate the p99
    with the monitor over the p99 without it (when a monitor-off server ran beside it)."""
    import httpx

    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(
            ("towerann_recall{", "towerann_recall_sample_count{", "towerann_recall_samples_dropped_total{")
        ):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    out: dict[str, Any] = {"sample": sample, "metrics": values}
    if rates_off:
        out["p99_with_over_without"] = [
            round(a["end_to_end"]["p99_ms"] / b["end_to_end"]["p99_ms"], 3) for a, b in zip(rates, rates_off)
        ]
        print(
            "p99 with the monitor / without, per rate: "
            + ", ".join(f"{a['target_rps']:.0f}/s {x:.3f}" for a, x in zip(rates, out["p99_with_over_without"])),
            flush=True,
        )
    return out


def _process_memory(pid: int) -> dict[str, float]:
    """The server's memory in MiB after the load: all of it (VmRSS, VmHWM), its own (RssAnon) and mapped
    files (RssFile: the page cache of a memory-mapped index, which the kernel can drop)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile") if key in fields
    }


def _plot(result: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        rates = result["http"]
        x = [r["achieved_rps"] for r in rates]
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            ax1.plot(x, [r["end_to_end"][key] for r in rates], marker="o", label=f"HTTP end to end {label}")
        grpc_rates = result.get("grpc") or []  # --grpc: the same rates over gRPC
        xg = [r["achieved_rps"] for r in grpc_rates]
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")) if grpc_rates else ():
            ax1.plot(xg, [r["end_to_end"][key] for r in grpc_rates], marker="x", ls=":", label=f"gRPC {label}")
        ax1.axhline(result["in_process"]["end_to_end"]["p99_ms"], ls="--", c="gray", label="in-process p99")
        ax1.set_xlabel("achieved requests/s")
        ax1.set_ylabel("ms")
        ax1.set_yscale("log")
        ax1.set_title(f"{result['items']} items, k={result['k']}, store={result['store']}")
        ax1.legend(fontsize=8)
        stages = ("features", "user_tower", "ann", "total")
        inp = [result["in_process"]["stages"][s]["p50_ms"] for s in stages]
        low = rates[0]["stages"] if rates and rates[0]["stages"] else None
        xs = np.arange(len(stages))
        ax2.bar(xs - 0.2, inp, 0.4, label="in-process p50")
        if low:
            ax2.bar(
                xs + 0.2, [low[s]["p50_ms"] for s in stages], 0.4, label=f"HTTP p50 @ {rates[0]['target_rps']:.0f}/s"
            )
        ax2.set_xticks(xs, stages)
        ax2.set_ylabel("ms (server-side stage timings)")
        ax2.legend(fontsize=8)

    return draw


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "serve",
        help="request latency per stage and end to end: HTTP server vs in-process",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 1_000_000, users=20_000, dim=64, trained=True)
    p.add_argument("--epochs", type=int, default=1, help="training epochs for the bench model (default 1)")
    add_k(p, 100)
    add_kind(p, what="of the served bundle")
    add_recall(p, "tune the index to this recall@k on held-out user queries")
    p.add_argument(
        "--store",
        default="embedded",
        help="embedded | redis (a redis-server is started) | redis://HOST:PORT/DB (default embedded)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="server processes (default 1; more than one needs --store redis)"
    )
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[50, 100, 200, 400, 600, 800, 1200, 1600],
        help="arrival rates to sweep, requests/s (stops at saturation; default 50 100 200 400 600 800 1200 1600)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate (default 10)")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections of the generator (default 64)")
    p.add_argument("--events", type=int, default=500, help="click events posted one at a time (default 500)")
    p.add_argument("--inproc-requests", type=int, default=3000, help="requests for the in-process run (default 3000)")
    p.add_argument(
        "--monitor-sample",
        type=float,
        default=None,
        help="[monitor] sample of the served config, and a second server with the recall monitor off "
        "taking the same load, rate by rate in alternation: the p99 with and without it (0: one "
        "server, monitor off; default: one server with the config's default, 1%%)",
    )
    p.add_argument(
        "--grpc",
        action="store_true",
        help="also serve gRPC (serve --grpc-port) and offer every rate over it too, in alternation with HTTP: "
        'the same requests as towerann.client.GrpcClient sends them (result key "grpc")',
    )
    p.add_argument(
        "--index",
        default=None,
        metavar="ROOT",
        help="serve this published root as it is instead of building the workload: query_vector requests (the "
        "rows of --queries; no click events) or a dataset's users (--data; a bundle with its model)",
    )
    p.add_argument("--queries", default=None, metavar="FILE.npy", help="with --index: the query vectors [n, dim]")
    p.add_argument(
        "--data",
        default=None,
        metavar="DATASET",
        help="with --index (a bundle with its model): user_id requests for this dataset's users, whose features "
        "are loaded into the store (and click events posted)",
    )
    add_workdir(p, "where the workload is built and cached")
    add_out(p)
    p.set_defaults(func=run)

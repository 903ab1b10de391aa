"""`towerann bench drift`: a tuned bundle served while the query distribution moves away from the one it
was tuned on; the online recall, the live re-tune's actions and the latency over one time axis.

A seeded synthetic vector catalog (data.synth_vectors: Zipf-sized clusters under a power-law spectrum,
unit vectors, inner product) is split by cluster into roles: the *head* clusters (the largest, holding
half of the catalog), the *tail* clusters (the rest) and a *new* block of tail clusters (--new-share of
--items more items, held back). The catalog (head + tail, --items items) is published as a vectors-only
bundle of --kind, tuned to --recall@--k on queries of the tail clusters (a query: the mean of 2-4 items of
one cluster plus noise, near a cluster but on no item), and served by `towerann serve` in a subprocess on
loopback (JSON log lines, no access log) with the recall monitor and the live re-tune configured by the
options below (serving.retune_loop; docs/operations.md, "Live re-tune").

A client in its own process sends `query_vector` requests at a fixed open-loop --rate through phases:
  baseline   queries of the tuning distribution (fresh draws from the tail clusters);
  categories sessions move to other categories: queries of the head clusters (the few large, dense ones),
             which tuning never saw;
  new_items  the new block is POSTed live with its vectors (--insert-batch items a call, --insert-rate
             items/s) while the queries aim at the new clusters, each at items already acknowledged;
  far_off    far-off queries: the mean of 3-8 random catalog items plus noise, between clusters.
Each phase lasts at least --min-phase-s and ends once the client's recall has been at or over the target
for --hold-s with no re-tune running, or at --phase-s (new_items: both counted from the ingest's end).

Recorded on one time axis (seconds since the first request): per second the client's p50/p99 (end to end,
from the scheduled send) and the server's own ann-stage p99, failures; the recall of a share of the answers
(--check-share) computed by the client against exact search over the catalog it knows (items acknowledged
before the request was sent; an item whose write was in flight counts either way), so the result does not
rest on the server's monitor alone; the server's online recall (GET /v1/admin/recall) and the loop's state
(/readyz) every --poll-s; the loop's actions from the server's state-change log lines. Per phase: the time
from its start until the client's recall (mean over the last --window-s of the phase's own checked answers)
is back at the target (0 when it never fell under it, null when it never came back), the worst p99 over a
trailing --window-s (judged against the budget, [retune] max_p99_ms; at 50 requests/s one second's "p99" is
its slowest answer, so the per-second worst is reported beside it, not judged), failures, and the actions
taken. JSON + a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import json
import math
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.options import add_catalog, add_k, add_kind, add_out, add_recall, add_seed, add_workdir
from towerann.bench.report import begin_run, percentiles, write_report
from towerann.bench.serve import post_json
from towerann.errors import ConfigError

TOKEN = "drift-token"
PHASES = ("baseline", "categories", "new_items", "far_off")
PHASE_TEXT = {
    "baseline": "queries of the tuning distribution (tail clusters)",
    "categories": "queries of the head clusters, which tuning never saw",
    "new_items": "new items posted live, queries aimed at those posted",
    "far_off": "far-off queries: the mean of 3-8 random items plus noise",
}
DEFAULT_BUDGET_MS = 10.0  # --max-p99-ms: [retune] max_p99_ms's own default
HEAD_SHARE = 0.5  # the largest clusters holding this share of the catalog are the tuning distribution's
CLUSTER_MIX = (2, 4)  # items averaged into one cluster query
CLUSTER_NOISE = 0.5  # its noise, relative to the norm of that mean (synth_vectors' far-off queries use 1.0)
QUERIES_PER_PHASE = 20_000  # distinct queries each phase draws from, in order (none repeats within 400 s at 50/s)
TUNING_QUERIES = 1000
MIN_WINDOW_SAMPLES = 20  # a recall window of fewer checked answers is not judged
BOUND_Z = 1.645  # a window is measurably under the target when mean + z sd / sqrt(n) is (the loop's 0.95 one-sided)
KEEP_CURVE = ("curve",)  # fields of a re-tune record left out of the JSON (long)
ACTION_EVENTS = (
    "retune_started",
    "retune_applied",
    "retune_refused",
    "retune_failed",
    "retune_skipped",
    "recall_unrestorable",
    "rebuild_failed",
    "bundle_swapped",
    "bundle_refused",
)


# ---- the workload --------------------------------------------------------------------------------


@dataclass
class Workload:
    vectors: np.ndarray  # f32 [items + new, dim]: the catalog (rows 0..items-1), then the new block
    clusters: np.ndarray  # int32 per row
    items: int  # rows published; rows items.. are the new block, posted live in order
    queries: dict[str, np.ndarray]  # phase -> f32 [QUERIES_PER_PHASE, dim]
    tuning: np.ndarray  # the bundle's tuning queries (tail clusters, drawn apart from the baseline's)
    # per new_items query (sorted): the new-block row it waits for; it is asked once that row is acknowledged
    arrival: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def new(self) -> int:
        return len(self.vectors) - self.items


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return out


def cluster_queries(
    vectors: np.ndarray, clusters: np.ndarray, rows: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """n queries near the clusters of `rows` (a cluster drawn in proportion to its rows among them): the
    mean of CLUSTER_MIX items of that cluster, all from `rows`, plus noise (CLUSTER_NOISE x the mean's norm)."""
    rows = rows[np.argsort(clusters[rows], kind="stable")]
    ids, starts, counts = np.unique(clusters[rows], return_index=True, return_counts=True)
    which = np.searchsorted(ids, clusters[rows[rng.integers(0, len(rows), n)]])
    lo, hi = CLUSTER_MIX
    m = rng.integers(lo, hi + 1, n)
    total = np.zeros((n, vectors.shape[1]), np.float32)
    for j in range(hi):
        pick = rows[starts[which] + rng.integers(0, counts[which])]
        total += vectors[pick] * (j < m)[:, None]
    mean = total / m[:, None].astype(np.float32)
    size = np.linalg.norm(mean, axis=1, keepdims=True) / np.sqrt(np.float32(vectors.shape[1]))
    return _unit(mean + np.float32(CLUSTER_NOISE) * size * rng.standard_normal(mean.shape, dtype=np.float32))


def arriving_queries(
    vectors: np.ndarray, clusters: np.ndarray, items: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n queries aimed at the new block as it arrives, and the row each waits for (sorted): query j is made
    like cluster_queries' from the cluster of new row a_j, of that cluster's new rows up to a_j only, so it
    aims at items already posted once rows ..a_j are acknowledged."""
    new = len(vectors) - items
    anchor = np.sort(rng.integers(0, new, n))
    rel = np.arange(new)
    order = np.lexsort((rel, clusters[items:]))  # the new rows by cluster, then by arrival
    by_cluster = clusters[items:][order]
    ids, starts = np.unique(by_cluster, return_index=True)
    first = starts[np.searchsorted(ids, clusters[items + anchor])]  # where the anchor's cluster begins in `order`
    where = np.empty(new, np.int64)
    where[order] = rel  # each new row's place in `order`
    count = where[anchor] - first + 1  # the cluster's rows up to the anchor, itself included
    lo, hi = CLUSTER_MIX
    m = rng.integers(lo, hi + 1, n)
    total = np.zeros((n, vectors.shape[1]), np.float32)
    for j in range(hi):
        pick = items + order[first + rng.integers(0, count)]
        total += vectors[pick] * (j < m)[:, None]
    mean = total / m[:, None].astype(np.float32)
    size = np.linalg.norm(mean, axis=1, keepdims=True) / np.sqrt(np.float32(vectors.shape[1]))
    noisy = mean + np.float32(CLUSTER_NOISE) * size * rng.standard_normal(mean.shape, dtype=np.float32)
    return _unit(noisy), anchor


def make_workload(items: int, new_share: float, dim: int, seed: int) -> Workload:
    """The catalog, the new block and the queries of every phase (see the module docstring)."""
    from towerann.data.synth_vectors import far_off_catalog

    if items < 1000 or not 0 < new_share <= 1 or dim < 2:
        raise ConfigError(f"need --items >= 1000, 0 < --new-share <= 1, --dim >= 2; got {items}, {new_share}, {dim}")
    new = max(1, round(items * new_share))
    cat = far_off_catalog(items + new, QUERIES_PER_PHASE, dim, seed=seed)
    sizes = np.bincount(cat.clusters, minlength=int(cat.params["n_clusters"]))
    order = np.argsort(-sizes, kind="stable")
    head = order[: int(np.searchsorted(np.cumsum(sizes[order]), HEAD_SHARE * items)) + 1]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    others = rng.permutation(order[len(head) :])
    enough = int(np.searchsorted(np.cumsum(sizes[others]), new)) + 1
    if enough > len(others):
        raise ConfigError(f"the tail clusters hold fewer than {new} items: lower --new-share")
    in_new = np.isin(cat.clusters, others[:enough])
    new_rows = rng.permutation(np.flatnonzero(in_new))[:new]  # shuffled: every new cluster grows during the ingest
    is_new = np.zeros(len(cat.clusters), bool)
    is_new[new_rows] = True
    base_rows = np.flatnonzero(~is_new)
    perm = np.concatenate([base_rows, new_rows])
    vectors, clusters = cat.vectors[perm], cat.clusters[perm]
    del cat.vectors
    is_head = np.isin(clusters, head)
    base = np.arange(items)
    qrng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    tuning = cluster_queries(vectors, clusters, base[~is_head[:items]], TUNING_QUERIES, qrng)
    queries = {
        "baseline": cluster_queries(vectors, clusters, base[~is_head[:items]], QUERIES_PER_PHASE, qrng),
        "categories": cluster_queries(vectors, clusters, base[is_head[:items]], QUERIES_PER_PHASE, qrng),
        "far_off": cat.queries,
    }
    queries["new_items"], arrival = arriving_queries(vectors, clusters, items, QUERIES_PER_PHASE, qrng)
    params = {
        **cat.params,
        "items": items,
        "new_items": new,
        "head_clusters": len(head),
        "head_items": int(is_head[:items].sum()),
        "tail_clusters": int(len(others) - enough),
        "new_clusters": enough,
        "cluster_query_mix": list(CLUSTER_MIX),
        "cluster_query_noise": CLUSTER_NOISE,
        "queries_per_phase": QUERIES_PER_PHASE,
        "tuning_queries": TUNING_QUERIES,
    }
    return Workload(vectors, clusters.astype(np.int32), items, queries, tuning, arrival, params)


def build_root(
    work: Workload, root: Path, kind: str, recall: float, k: int, start: dict[str, Any], build_params: dict[str, Any]
) -> dict[str, Any]:
    """Publish the catalog as a vectors-only bundle under `root`, tuned to recall@k on the tuning queries;
    `start`: search settings it starts from instead of the tuned ones (the loop must then act)."""
    from towerann.data.vectors_dir import VectorSet
    from towerann.freshness.publish import publish_bundle
    from towerann.index.build import Tuning, build_index

    n = work.items
    names = [f"c{c}" for c in range(int(work.clusters.max()) + 1)]
    vs = VectorSet(
        vectors=work.vectors[:n],
        ids=np.arange(n, dtype=np.int64),
        categories=work.clusters[:n].astype(np.int32),
        available=np.ones(n, bool),
        category_names=names,
        external_ids=np.arange(n, dtype=np.int64),
        model_version=f"drift-synthetic-{n}-{work.vectors.shape[1]}",
        dim=work.vectors.shape[1],
        metric="ip",
    )
    t0 = time.perf_counter()
    index = build_index(
        vs.vectors,
        vs.ids,
        vs.categories,
        vs.available,
        kind=kind,
        params=build_params or None,
        tuning=Tuning(work.tuning, k, recall),
        calibrate_filters=False,  # no filtered request here: the loop judges unfiltered ones only
    )
    tuned = {key: v for key, v in (index.tuning or {}).items() if key not in KEEP_CURVE}
    index.search_defaults.update(start)
    path = publish_bundle(root, None, vs, index=index, validation_queries=work.tuning)
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "version": path.name,
        "index": index.describe(),
        "tuning": tuned,
        "start_settings": dict(start),
        "search_defaults": {key: v for key, v in index.search_defaults.items() if key != "filter_plan"},
    }


def prepared_root(args: argparse.Namespace, work: Workload, start: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The pristine published root for these settings, built once under --workdir and reused."""
    # --new-share is in the key: the catalog is drawn with the new block, so another share is another catalog
    # (a run at 0.02 reusing the 0.2 bundle measured recall 0.000 against its own exact search).
    key = f"drift-{args.items}-n{args.new_share:g}-d{args.dim}-{args.kind}-r{args.recall:g}@{args.k}-s{args.seed}"
    if start:
        key += "-start-" + "-".join(f"{k}{v}" for k, v in sorted(start.items()))
    if args.build_params:
        key += "-build-" + "-".join(f"{k}{v}" for k, v in sorted(args.build_params.items()))
    pristine = Path(args.workdir) / key / "pristine"
    info_path = pristine.parent / "build.json"
    if not (pristine / "CURRENT").exists() or not info_path.exists():
        shutil.rmtree(pristine, ignore_errors=True)
        pristine.mkdir(parents=True)
        info = build_root(work, pristine, args.kind, args.recall, args.k, start, args.build_params)
        info_path.write_text(json.dumps(info, indent=1, default=str))
        print(
            f"built {info['index']} over {work.items} items in {info['seconds']}s: tuned {info['tuning']}", flush=True
        )
    return pristine, json.loads(info_path.read_text())


def fresh_copy(pristine: Path, to: Path) -> Path:
    """A run's own root: the pristine one, its files hard-linked (a re-tune publishes new files, and every
    file of a version is written once, renamed into place, never changed)."""
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(pristine, to, copy_function=os.link)
    return to


def server_config(args: argparse.Namespace, run_dir: Path, root: Path) -> Path:
    (run_dir / "token").write_text(TOKEN + "\n")
    toml = run_dir / "drift.toml"
    toml.write_text(
        f"[serve]\nmax_body_bytes = {32 << 20}\n"
        f'[paths]\nindex = "{root}"\nmodel = "{run_dir / "no-model"}"\ndata = "{run_dir / "no-data"}"\n'
        '[features]\nstore = "memory"\n'
        f'[freshness]\ndelta_path = "{run_dir / "delta.sqlite"}"\ntoken_file = "{run_dir / "token"}"\n'
        "poll_s = 0.0\nmin_recall = 0.0\n"
        f"[monitor]\nsample = {args.sample}\nthreshold = 0.0\nqueue = 256\nmax_busy = {args.max_busy}\n"
        f"reservoir = {args.reservoir}\nreservoir_max_age_s = {args.reservoir_max_age_s}\nreservoir_save_s = 30.0\n"
        f"[retune]\nenabled = true\nsamples = {args.samples}\nconfidence = {args.confidence}\n"
        f"max_p99_ms = {args.max_p99_ms}\nholdout = 0.3\nmin_queries = {args.min_queries}\nmargin = {args.margin}\n"
        f"cooldown_s = {args.cooldown_s}\nkeep = 3\n"
    )
    return toml


# ---- the client: an open-loop generator in its own process ------------------------------------------------


def _body(q: np.ndarray, k: int) -> bytes:
    return json.dumps({"query_vector": [round(float(x), 7) for x in q], "k": k}).encode()


async def _drive(
    url: str,
    queries: list[np.ndarray],
    arrival: np.ndarray,
    k: int,
    rate: float,
    connections: int,
    check_every: int,
    phase: Any,
    acked: Any,
    stop: Any,
    out: Any,
) -> None:
    """Send `rate` requests/s on a fixed schedule (open loop: queueing shows in the latency, from the
    scheduled send) over keep-alive connections; request i asks the next query of the phase set now (in
    new_items, a random one of those whose row is acknowledged, `acked`; none yet: the set before it).
    Records (i, sent unix s, latency ms or -1, status or 0, phase, query, server ann ms, ids of every
    check_every-th answer) go to `out` in batches, then None."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    work: asyncio.Queue[tuple[int, float, float, int, int] | None] = asyncio.Queue()
    buf: list[tuple[Any, ...]] = []
    done = asyncio.Event()

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                item = await work.get()
                if item is None:
                    return
                i, t_sched, t_unix, p, qi = item
                body = _body(queries[p][qi], k)
                try:
                    status, payload = await post_json(reader, writer, host, "/v1/candidates", body)
                    lat = (time.perf_counter() - t_sched) * 1e3
                    ann, ids = None, None
                    if status == 200:
                        answer = json.loads(payload)
                        ann = (answer.get("timings_ms") or {}).get("ann")
                        if i % check_every == 0:
                            ids = [int(c["item_id"]) for c in answer["candidates"]]
                    buf.append((i, t_unix, round(lat, 3), status, p, qi, ann, ids))
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    buf.append((i, t_unix, -1.0, 0, p, qi, None, None))
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    async def flush() -> None:
        while not done.is_set():
            await asyncio.sleep(0.5)
            if buf:
                out.put(buf[:])
                buf.clear()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    flusher = asyncio.create_task(flush())
    t0 = time.perf_counter() + 0.05
    t0_unix = time.time() + 0.05
    taken = [0] * len(queries)
    arriving = PHASES.index("new_items")
    rng = np.random.default_rng(0)
    i = 0
    while not stop.is_set():
        t_sched = t0 + i / rate
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        p = int(phase.value)
        ready = int(np.searchsorted(arrival, int(acked.value))) if p == arriving else 0
        if p == arriving and ready:
            qi = int(rng.integers(ready))
        else:
            p -= p == arriving  # nothing posted yet to aim at
            qi = taken[p] % len(queries[p])
            taken[p] += 1
        work.put_nowait((i, t_sched, t0_unix + i / rate, p, qi))
        i += 1
    for _ in workers:
        work.put_nowait(None)
    await asyncio.gather(*workers)
    done.set()
    await flusher
    if buf:
        out.put(buf[:])
    out.put(None)


def _client_main(
    url: str,
    queries: list[np.ndarray],
    arrival: np.ndarray,
    k: int,
    rate: float,
    connections: int,
    check_every: int,
    phase: Any,
    acked: Any,
    stop: Any,
    out: Any,
) -> None:
    import gc

    gc.disable()  # a collector pause in the generator would show up as server latency
    asyncio.run(_drive(url, queries, arrival, k, rate, connections, check_every, phase, acked, stop, out))


# ---- the client's own recall: exact search over the catalog it knows ------------------------------------


def exact_top_k(
    vectors: np.ndarray, queries: np.ndarray, limits: np.ndarray, k: int, base: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, scores) [m, k] of each query's k best rows by inner product among rows 0..limits[j]-1, every
    limit at least `base`: rows ..base-1 by faiss' brute force for all queries at once, the rest per query."""
    import faiss

    q = np.ascontiguousarray(queries, np.float32)
    scores, ids = faiss.knn(q, vectors[:base], k, metric=faiss.METRIC_INNER_PRODUCT)
    for limit in np.unique(limits[limits > base]):  # the queries of one catalog size together
        js = np.flatnonzero(limits == limit)
        kk = min(k, int(limit) - base)
        s2, i2 = faiss.knn(q[js], vectors[base:limit], kk, metric=faiss.METRIC_INNER_PRODUCT)
        scores[js], ids[js] = _merge(scores[js], ids[js], s2, np.where(i2 >= 0, i2 + base, -1), k)
    ids[~np.isfinite(scores) | (ids < 0)] = -1
    return ids, scores


def _merge(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, ids) per row of two candidate sets."""
    all_s = np.concatenate([s1, s2], axis=1)
    all_i = np.concatenate([i1, i2], axis=1)
    if all_s.shape[1] > k:
        keep = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        all_s, all_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
    return all_s, all_i


def recall_of(found: Sequence[int], truth: np.ndarray) -> float | None:
    t = truth[truth >= 0]
    if not len(t):
        return None
    return len(np.intersect1d(np.asarray(found, np.int64), t)) / len(t)


class Ingest:
    """The new block's writes: each call's [sent unix s, acknowledged unix s (inf while in flight), rows
    acknowledged after it]."""

    def __init__(self, items: int, shared: Any = None):
        self.items, self.shared = items, shared  # shared: a multiprocessing Value the client reads the count from
        self.calls: list[list[float]] = []
        self.acked = 0  # new rows acknowledged (rows items..items+acked-1 are in the served catalog)
        self.failed: list[str] = []
        self.started: float | None = None
        self.ended: float | None = None
        self._lock = threading.Lock()

    def catalog_at(self, sent: float, answered: float) -> tuple[int, list[int]]:
        """The catalogs a request may have been answered from, as row counts: (rows surely searchable when it
        was sent: the writes acknowledged before, [every larger count a write started before its answer came
        may have made searchable]). Writes are applied whole and one after another, so these are all."""
        with self._lock:
            lo = max((int(n) for s, a, n in self.calls if a <= sent), default=0)
            more = sorted({int(n) for s, a, n in self.calls if s <= answered and n > lo})
        return self.items + lo, [self.items + n for n in more]

    def sending(self, sent: float, rows: int) -> list[float]:
        call = [sent, math.inf, float(rows)]
        with self._lock:
            self.calls.append(call)
        return call

    def done(self, call: list[float], ok: bool) -> None:
        with self._lock:
            if ok:
                call[1] = time.time()
                self.acked = int(call[2])
                if self.shared is not None:
                    self.shared.value = self.acked
            else:
                self.calls.remove(call)


class Checker:
    """A thread scoring the checked answers against exact search, a batch a second (BLAS on one thread: it
    shares the machine with the server; at the server's priority, since a niced checker starves on a loaded
    machine and the phases wait on its recall)."""

    def __init__(self, work: Workload, ingest: Ingest, k: int):
        self.work, self.ingest, self.k = work, ingest, k
        self.pending: list[tuple[float, float, int, int, list[int]]] = []  # sent, answered, phase, query, ids
        self.scored: list[tuple[float, int, float]] = []  # sent unix, phase, recall
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift-checker", daemon=True)

    def start(self) -> Checker:
        self._thread.start()
        return self

    def offer(self, sent: float, answered: float, phase: int, query: int, ids: list[int]) -> None:
        with self._lock:
            self.pending.append((sent, answered, phase, query, ids))

    def _run(self) -> None:
        import faiss
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(1)  # the only faiss of this process: brute force on one core
        with threadpool_limits(limits=1):
            while not self._stop.wait(1.0):
                self.score()
            self.score()

    def score(self) -> None:
        """Each answer's recall against exact search over the catalog it was answered from; where a write was
        in flight, the best over the catalogs it may have seen (Ingest.catalog_at)."""
        with self._lock:
            batch, self.pending = self.pending, []
        if not batch:
            return
        vectors, k = self.work.vectors, self.k
        qs = np.stack([self.work.queries[PHASES[p]][qi] for _, _, p, qi, _ in batch])
        bounds = [self.ingest.catalog_at(sent, answered) for sent, answered, *_ in batch]
        ids, scores = exact_top_k(vectors, qs, np.array([lo for lo, _ in bounds]), k, self.work.items)
        out = []
        for j, (sent, _, p, _, found) in enumerate(batch):
            lo, more = bounds[j]
            r = [recall_of(found, ids[j])]
            if more:  # the rows that may have been searchable: a few writes' worth
                extra = np.arange(lo, more[-1])
                extra_s = (vectors[lo : more[-1]] @ qs[j])[None, :]
                for n in more:
                    sel = extra < n
                    _, t = _merge(scores[j : j + 1], ids[j : j + 1], extra_s[:, sel], extra[None, sel], k)
                    t = t.copy()
                    r.append(recall_of(found, t[0]))
            values = [x for x in r if x is not None]
            if values:
                out.append((sent, p, max(values)))
        with self._lock:
            self.scored.extend(out)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=600)

    def window(self, phase: int, since: float, until: float) -> tuple[float | None, int]:
        """(mean recall, count) of the checked answers of `phase` sent in (since, until]."""
        with self._lock:
            r = [x for t, p, x in self.scored if p == phase and since < t <= until]
        return (float(np.mean(r)) if len(r) >= MIN_WINDOW_SAMPLES else None), len(r)


# ---- the server's side: polls and log lines ------------------------------------------------------------


class Poller:
    """A thread asking /readyz and /v1/admin/recall every `every_s`: the served version, its online recall
    (the monitor's window mean of unfiltered samples), the loop's state, outcomes and last re-tune."""

    def __init__(self, url: str, every_s: float):
        self.url, self.every_s = url, every_s
        self.samples: list[dict[str, Any]] = []
        self.state: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift-poller", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            while not self._stop.is_set():
                try:
                    self.samples.append(self.poll(http))
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    self.samples.append({"t": time.time(), "error": f"{type(e).__name__}: {e}"[:200]})
                self._stop.wait(self.every_s)

    def poll(self, http: Any) -> dict[str, Any]:
        t = time.time()
        ready = http.get("/readyz").json()
        recall = http.get("/v1/admin/recall").json()
        version = ready.get("index_version")
        mine = (recall.get("bundles") or {}).get(version, {}).get("none") or {}
        retune = (ready.get("recall") or {}).get("retune") or {}
        self.state = retune.get("state")
        last = retune.get("last")
        return {
            "t": t,
            "version": version,
            "items": ready.get("items"),
            "recall": mine.get("recall"),
            "window": mine.get("window"),
            "samples": mine.get("samples"),
            "state": retune.get("state"),
            "target": retune.get("target"),
            "judged": retune.get("samples"),
            "outcomes": retune.get("outcomes"),
            "live_queries": (ready.get("recall") or {}).get("live_queries"),
            "dropped": recall.get("dropped"),
            "last": None if last is None else {k: v for k, v in last.items() if k not in KEEP_CURVE},
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def parse_ts(ts: str) -> float:
    """A JSON log line's ts ("2025-01-02T10:00:00.123Z", UTC) as unix seconds."""
    whole, _, frac = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + (int(frac) / 1000 if frac else 0.0)


def log_events(log_file: Path) -> list[dict[str, Any]]:
    """The server's state-change lines (JSON objects with an `event`), in order, with unix `t`."""
    out: list[dict[str, Any]] = []
    if not log_file.exists():
        return out
    for line in log_file.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event"):
            rec["t"] = parse_ts(str(rec.get("ts", "")))
            out.append(rec)
    return out


# ---- the run ------------------------------------------------------------------------------------------------


def _insert(url: str, work: Workload, ingest: Ingest, batch: int, rate: float) -> None:
    """POST the new block in order, `batch` rows a call, paced to `rate` rows/s; a failing call is tried
    three times, then the ingest stops (the rows after it are never sent: the client's catalog stays a prefix)."""
    import httpx

    ingest.started = time.time()
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for s in range(0, work.new, batch):
            wait = t0 + s / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            rows = work.items + np.arange(s, min(s + batch, work.new))
            body = {
                "items": [
                    {
                        "item_id": str(int(r)),
                        "category": f"c{int(work.clusters[r])}",
                        "available": True,
                        "vector": [float(x) for x in work.vectors[r]],
                    }
                    for r in rows
                ]
            }
            for attempt in range(3):
                call = ingest.sending(time.time(), s + len(rows))
                try:
                    r = http.post("/v1/items", json=body)
                    ingest.done(call, r.status_code == 200)
                    if r.status_code == 200:
                        break
                    why = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ingest.done(call, False)
                    why = f"{type(e).__name__}: {e}"[:200]
                ingest.failed.append(f"rows {s}..{s + len(rows) - 1}, try {attempt + 1}: {why}")
            else:
                break
    ingest.ended = time.time()


def run(args: argparse.Namespace) -> int:
    from towerann.server.server import start_subprocess

    begin_run()
    args.build_params = _params(args.build_params_json, "--build-params")
    start = _params(args.search_params, "--search-params")
    if not 0 < args.check_share <= 1:
        raise ConfigError(f"--check-share must be in (0, 1], got {args.check_share}")
    t_prep = time.perf_counter()
    work = make_workload(args.items, args.new_share, args.dim, args.seed)
    print(
        f"workload: {work.items} items + {work.new} new ({work.params['head_clusters']} head clusters holding "
        f"{work.params['head_items']} items, {work.params['new_clusters']} new clusters), dim {args.dim}, "
        f"in {time.perf_counter() - t_prep:.1f}s",
        flush=True,
    )
    pristine, build = prepared_root(args, work, start)
    run_dir = pristine.parent / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    root = fresh_copy(pristine, run_dir / "indexes")
    toml = server_config(args, run_dir, root)
    log_file = run_dir / "server.log"
    server = start_subprocess(
        root, "memory", config=toml, timeout_s=900, log_file=log_file, args=["--log-format", "json"]
    )
    ctx = mp.get_context("spawn")
    phase_v = ctx.Value("i", 0)
    acked_v = ctx.Value("q", 0)
    stop = ctx.Event()
    out_q = ctx.Queue()
    check_every = max(1, round(1 / args.check_share))
    client = ctx.Process(
        target=_client_main,
        args=(
            server.url,
            [work.queries[p] for p in PHASES],
            work.arrival,
            args.k,
            args.rate,
            args.connections,
            check_every,
            phase_v,
            acked_v,
            stop,
            out_q,
        ),
        daemon=True,
    )
    ingest = Ingest(work.items, acked_v)
    checker = Checker(work, ingest, args.k).start()
    records: list[tuple[Any, ...]] = []
    collected = threading.Event()

    def collect() -> None:
        while (batch := out_q.get()) is not None:
            for rec in batch:
                records.append(rec)
                if rec[7] is not None:
                    checker.offer(rec[1], rec[1] + rec[2] / 1e3, rec[4], rec[5], rec[7])
        collected.set()

    collector = threading.Thread(target=collect, name="drift-collector", daemon=True)
    poller = Poller(server.url, args.poll_s)
    phases: list[dict[str, Any]] = []
    inserter: threading.Thread | None = None
    try:
        collector.start()
        client.start()
        t0 = time.time()
        poller.start()
        for p, name in enumerate(PHASES):
            phase_v.value = p
            start_t = time.time()
            print(f"[{start_t - t0:7.1f}s] phase {name}: {PHASE_TEXT[name]}", flush=True)
            if name == "new_items":
                inserter = threading.Thread(
                    target=_insert,
                    args=(server.url, work, ingest, args.insert_batch, args.insert_rate),
                    name="drift-inserter",
                    daemon=True,
                )
                inserter.start()
            ended = _run_phase(args, p, start_t, checker, poller, inserter if name == "new_items" else None, t0)
            phases.append({"name": name, "what": PHASE_TEXT[name], "start": start_t, "end": time.time(), **ended})
        stop.set()
        collected.wait(120)
        client.join(timeout=30)
        checker.stop()
        poller.stop()
        final = _final(server.url)
    finally:
        stop.set()
        if client.is_alive():
            client.terminate()
        server.stop()
    if inserter is not None:
        inserter.join(timeout=5)
    result = analyse(args, work, build, records, checker, poller, ingest, phases, log_events(log_file), t0)
    result["server_at_end"] = final
    name = f"drift-{args.items}-{args.kind}"
    if args.max_p99_ms != DEFAULT_BUDGET_MS:  # a run under another budget is another result, beside the default's
        name += f"-p99-{args.max_p99_ms:g}ms"
    json_path, png_path = write_report(args.out, name, result, _plot(result))
    for ph in result["phases"]:
        print(
            f"{ph['name']:>10}: {ph['seconds']:.0f}s, recall min {_f(ph['client_recall_min'])} end "
            f"{_f(ph['client_recall_end'])}, recovered in {ph['time_to_recover_s']}s; p99/s max "
            f"{_f(ph['p99_max_per_second_ms'], 1)} ms ({ph['seconds_over_budget']}s over), p99/{args.window_s:g}s max "
            f"{_f(ph['p99_window_max_ms'], 1)} ms ({ph['windows_over_budget']} windows over; budget "
            f"{args.max_p99_ms:g}); "
            f"failures {ph['failed']}; actions {[a['event'] for a in ph['actions']]}",
            flush=True,
        )
    print(f"targets: {result['targets']}\nwrote {json_path} and {png_path}")
    return 0


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _params(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{what}: a JSON object like '{{\"ef\": 10}}', got {text!r}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: a JSON object like '{{\"ef\": 10}}', got {text!r}")
    return value


def _run_phase(
    args: argparse.Namespace,
    p: int,
    start: float,
    checker: Checker,
    poller: Poller,
    inserter: threading.Thread | None,
    t0: float,
) -> dict[str, Any]:
    """Wait until the phase may end: --min-phase-s after its start (with an ingest: after the ingest's end),
    recall at or over the target for --hold-s with no re-tune under way; or --phase-s after that start."""
    held_since: float | None = None
    last_print = 0.0
    clock = start  # the ingest's end, once it has ended
    while True:
        time.sleep(1.0)
        now = time.time()
        mean, n = checker.window(p, max(start, now - args.window_s), now)
        ok = mean is not None and mean >= args.recall and poller.state != "retuning"
        held_since = (held_since or now) if ok else None
        ingesting = inserter is not None and inserter.is_alive()
        if ingesting:
            clock = now
        if now - last_print >= 15:
            last_print = now
            print(
                f"[{now - t0:7.1f}s] {PHASES[p]} +{now - start:.0f}s: client recall {_f(mean)} over {n} answers, "
                f"loop {poller.state}" + (" (ingesting)" if ingesting else ""),
                flush=True,
            )
        if ingesting:
            continue
        if now - clock >= args.phase_s:
            return {"ended_because": "time limit (--phase-s)"}
        if now - clock >= args.min_phase_s and held_since is not None and now - held_since >= args.hold_s:
            return {"ended_because": f"recall at or over the target for {args.hold_s:g}s"}


# ---- the analysis ---------------------------------------------------------------------------------------------


def _windows(scored: list[tuple[float, int, float]], p: int, start: float, end: float, window: float) -> list[Any]:
    """[(t end of window, mean, n, upper bound)] every second of the phase, over its own checked answers sent
    in the window; the upper bound is the loop's (one-sided BOUND_Z: mean + z sd / sqrt(n))."""
    t = np.array([s for s, ph, _ in scored if ph == p])
    r = np.array([x for _, ph, x in scored if ph == p])
    out = []
    for e in np.arange(start + 1.0, end + 1e-9, 1.0):
        sel = (t > max(start, e - window)) & (t <= e)
        n = int(sel.sum())
        if n >= MIN_WINDOW_SAMPLES:
            mean = float(r[sel].mean())
            out.append((float(e), mean, n, mean + BOUND_Z * float(r[sel].std(ddof=1)) / math.sqrt(n)))
    return out


def _recovery(windows: list[Any], target: float, start: float) -> dict[str, Any]:
    """Did the phase's recall fall measurably under the target (a window's upper bound under it), and how long
    from the phase start until a window's mean was back at or over it: 0 when it never fell, None when it
    never came back. `held_after_recovery`: the share of the windows after that one at or over the target."""
    if not windows:
        return {"time_to_recover_s": None, "dropped": None, "held_after_recovery": None}
    below = [i for i, w in enumerate(windows) if w[3] < target]
    if not below:
        return {"time_to_recover_s": 0.0, "dropped": False, "held_after_recovery": None}
    back = next((i for i in range(below[0], len(windows)) if windows[i][1] >= target), None)
    if back is None:
        return {"time_to_recover_s": None, "dropped": True, "held_after_recovery": None}
    after = [w[1] >= target for w in windows[back:]]
    return {
        "time_to_recover_s": round(windows[back][0] - start, 1),
        "dropped": True,
        "held_after_recovery": round(sum(after) / len(after), 3),
    }


def _applied_before(phase: dict[str, Any], start: float) -> list[float] | None:
    """When the phase's recall fell under the target and came back: the times (s since the first request)
    of the re-tunes applied in the phase before it was back ([]: it came back without one); else None."""
    back = phase.get("time_to_recover_s")
    if not phase.get("dropped") or back is None:
        return None
    return [a["t"] for a in phase["actions"] if a["event"] == "retune_applied" and a["t"] <= start + back]


def _action(ev: dict[str, Any], t0: float, lasts: list[dict[str, Any]]) -> dict[str, Any]:
    a: dict[str, Any] = {"t": round(ev["t"] - t0, 2), "event": ev["event"], "level": ev.get("level")}
    for key in ("outcome", "version", "from_version", "to_version", "reason", "error"):
        if key in ev:
            a[key] = ev[key]
    a["msg"] = str(ev.get("msg", ""))[:400]
    if ev["event"] in ("retune_applied", "retune_refused", "retune_failed", "retune_skipped"):
        a.setdefault("outcome", ev["event"].removeprefix("retune_"))
        for last in lasts:  # the loop's own record of it (/readyz recall.retune.last), as polled after
            if last.get("version") == a.get("version", a.get("from_version")) and last.get("reason") == a.get("reason"):
                a["details"] = {
                    k: last.get(k)
                    for k in ("outcome", "params", "heldout_recall", "tuning_recall", "p99_ms", "queries", "seconds")
                    if k in last
                }
                break
    return a


def trailing_p99(second: np.ndarray, values: np.ndarray, ok: np.ndarray, window: int) -> list[float | None]:
    """For each second s from 0 to the last, the p99 of the ok values sent in seconds (s - window, s] (NaNs
    ignored; None where there is none). At 50 requests/s one second holds 50 answers and their "p99" is the
    slowest one; a 20 s window holds ~1,000, which a p99 is a statement about."""
    out: list[float | None] = []
    for s in range(int(second.max()) + 1 if len(second) else 0):
        sel = ok & (second > s - window) & (second <= s) & ~np.isnan(values)
        out.append(round(float(np.percentile(values[sel], 99)), 3) if sel.any() else None)
    return out


def analyse(
    args: argparse.Namespace,
    work: Workload,
    build: dict[str, Any],
    records: list[tuple[Any, ...]],
    checker: Checker,
    poller: Poller,
    ingest: Ingest,
    phases: list[dict[str, Any]],
    events: list[dict[str, Any]],
    t0: float,
) -> dict[str, Any]:
    recs = sorted(records)
    sent = np.array([r[1] for r in recs])
    lat = np.array([r[2] for r in recs])
    status = np.array([r[3] for r in recs], np.int32)
    phase = np.array([r[4] for r in recs], np.int32)
    ann = np.array([np.nan if r[6] is None else r[6] for r in recs])
    ok = status == 200
    sec = np.floor(sent - t0).astype(int)
    per_second: list[dict[str, Any]] = []
    for s in range(int(sec.max()) + 1 if len(sec) else 0):
        sel = sec == s
        good = sel & ok
        per_second.append(
            {
                "t": s,
                "phase": PHASES[int(np.bincount(phase[sel]).argmax())] if sel.any() else None,
                "sent": int(sel.sum()),
                "failed": int((sel & ~ok).sum()),
                "p50_ms": round(float(np.median(lat[good])), 3) if good.any() else None,
                "p99_ms": round(float(np.percentile(lat[good], 99)), 3) if good.any() else None,
                "ann_p99_ms": round(float(np.nanpercentile(ann[good], 99)), 3) if good.any() else None,
            }
        )
    win = max(int(round(args.window_s)), 1)
    for row, p99, ann99 in zip(per_second, trailing_p99(sec, lat, ok, win), trailing_p99(sec, ann, ok, win)):
        row["p99_window_ms"], row["ann_p99_window_ms"] = p99, ann99
    lasts = [s["last"] for s in poller.samples if s.get("last")]
    actions = [_action(ev, t0, lasts) for ev in events if ev["event"] in ACTION_EVENTS]
    budget = float(args.max_p99_ms)
    out_phases = []
    client_recall = []
    for p, ph in enumerate(phases):
        start, end = ph["start"], ph["end"]
        windows = _windows(checker.scored, p, start, end, args.window_s)
        client_recall += [[round(w[0] - t0, 1), round(w[1], 4), w[2], PHASES[p]] for w in windows]
        in_phase = (sent >= start) & (sent < end)
        seconds = [s for s in per_second if start - t0 <= s["t"] < end - t0 and s["p99_ms"] is not None]
        over = [s for s in seconds if s["p99_ms"] > budget]
        windows_over = [s for s in seconds if (s["p99_window_ms"] or 0.0) > budget]
        ingesting = ingest.started is not None and p == PHASES.index("new_items")
        polls = [s for s in poller.samples if start <= s["t"] < end and s.get("recall") is not None]
        srv = [s["recall"] for s in polls]
        i_min = int(np.argmin(srv)) if srv else None
        srv_back = None
        if i_min is not None:
            back = next((s for s in polls[i_min:] if s["recall"] >= args.recall), None)
            srv_back = None if back is None else round(back["t"] - start, 1)
        checked = [x for t, q, x in checker.scored if q == p and start <= t < end]
        entry = {
            "name": ph["name"],
            "what": ph["what"],
            "start_s": round(start - t0, 2),
            "end_s": round(end - t0, 2),
            "seconds": round(end - start, 1),
            "ended_because": ph["ended_because"],
            **_recovery(windows, args.recall, start),
            "client_recall_min": round(min(w[1] for w in windows), 4) if windows else None,
            "client_recall_end": round(windows[-1][1], 4) if windows else None,
            "client_recall_mean": round(float(np.mean(checked)), 4) if checked else None,
            "client_checked": len(checked),
            "server_recall_min": None if i_min is None else srv[i_min],
            "server_recall_end": srv[-1] if srv else None,
            "server_back_at_target_after_min_s": srv_back,
            "sent": int(in_phase.sum()),
            "failed": int((in_phase & ~ok).sum()),
            "latency": percentiles(lat[in_phase & ok] / 1e3),
            "ann_p99_ms": round(float(np.nanpercentile(ann[in_phase & ok], 99)), 3) if (in_phase & ok).any() else None,
            "p99_max_per_second_ms": max((s["p99_ms"] for s in seconds), default=None),
            "p99_budget_ms": budget,
            "seconds_over_budget": len(over),
            "p99_window_max_ms": max(
                (s["p99_window_ms"] for s in seconds if s["p99_window_ms"] is not None), default=None
            ),
            "windows_over_budget": len(windows_over),
            "p99_within_budget": not windows_over,
            # the server's own time in the index (timings_ms.ann), what [retune] max_p99_ms judges one search by
            "ann_p99_max_per_second_ms": max(
                (s["ann_p99_ms"] for s in seconds if s["ann_p99_ms"] is not None), default=None
            ),
            "ann_seconds_over_budget": len([s for s in seconds if (s["ann_p99_ms"] or 0.0) > budget]),
            "ann_p99_window_max_ms": max(
                (s["ann_p99_window_ms"] for s in seconds if s["ann_p99_window_ms"] is not None), default=None
            ),
            "actions": [a for a in actions if start - t0 <= a["t"] < end - t0],
        }
        entry["applied_before_recovery"] = _applied_before(entry, start - t0)
        if ingesting:
            assert ingest.started is not None and ingest.ended is not None
            during = (sent >= ingest.started) & (sent < ingest.ended)
            entry["ingest"] = {
                "rows": ingest.acked,
                "of": work.new,
                "batch": args.insert_batch,
                "target_rows_per_s": args.insert_rate,
                "start_s": round(ingest.started - t0, 2),
                "end_s": round(ingest.ended - t0, 2),
                "rows_per_s": round(ingest.acked / max(ingest.ended - ingest.started, 1e-9), 1),
                "failed_calls": ingest.failed[:20],
                "latency_during": percentiles(lat[during & ok] / 1e3),
                "seconds_over_budget_during": len(
                    [s for s in over if ingest.started - t0 <= s["t"] < ingest.ended - t0]
                ),
            }
        out_phases.append(entry)
    shifts = out_phases[1:]
    applied = [a for a in actions if a["event"] == "retune_applied"]
    result: dict[str, Any] = {
        "items": args.items,
        "kind": args.kind,
        "dim": args.dim,
        "k": args.k,
        "recall_target": args.recall,
        "rate": args.rate,
        "connections": args.connections,
        "check_share": args.check_share,
        "window_s": args.window_s,
        "phase_rule": {
            "min_phase_s": args.min_phase_s,
            "phase_s": args.phase_s,
            "hold_s": args.hold_s,
        },
        "dataset": work.params,
        "build": build,
        "config": {
            "monitor": {
                "sample": args.sample,
                "max_busy": args.max_busy,
                "reservoir": args.reservoir,
                "reservoir_max_age_s": args.reservoir_max_age_s,
                "reservoir_save_s": 30.0,
            },
            "retune": {
                "samples": args.samples,
                "confidence": args.confidence,
                "max_p99_ms": args.max_p99_ms,
                "holdout": 0.3,
                "min_queries": args.min_queries,
                "margin": args.margin,
                "cooldown_s": args.cooldown_s,
                "keep": 3,
            },
        },
        "sent": int(len(recs)),
        "failed": int((~ok).sum()),
        "achieved_rps": round(len(recs) / max(float(sent[-1] - sent[0]), 1e-9), 1) if len(recs) > 1 else None,
        "phases": out_phases,
        "actions": actions,
        "outcomes": dict(sorted(_count(a.get("outcome") for a in actions if a.get("outcome")).items())),
        "targets": {
            "recall back at the target after each shift": all(s["time_to_recover_s"] is not None for s in shifts),
            "p99 of every window within the budget throughout": all(s["p99_within_budget"] for s in out_phases),
            "no failed request": not (~ok).any(),
            "re-tunes applied": len(applied),
        },
        "timeline": {
            "per_second": per_second,
            "client_recall": client_recall,
            # every checked answer: sent (s since the first request), phase index (PHASES), recall vs exact search
            "checked": {
                "t": [round(t - t0, 2) for t, _, _ in checker.scored],
                "phase": [p for _, p, _ in checker.scored],
                "recall": [round(x, 4) for _, _, x in checker.scored],
            },
            "server": [
                {key: v for key, v in s.items() if key not in ("last", "dropped")} | {"t": round(s["t"] - t0, 2)}
                for s in poller.samples
            ],
        },
    }
    return result


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _final(url: str) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        ready = http.get("/readyz").json()
        recall = http.get("/v1/admin/recall").json()
    return {
        "index_version": ready.get("index_version"),
        "items": ready.get("items"),
        "retune": (ready.get("recall") or {}).get("retune"),
        "monitor": {k: v for k, v in recall.items() if k != "bundles"},
    }


# ---- the plot ------------------------------------------------------------------------------------------------

ACTION_STYLE = {
    "retune_started": ("gray", ":"),
    "retune_applied": ("green", "-"),
    "retune_refused": ("red", "-"),
    "retune_failed": ("black", "-"),
    "retune_skipped": ("orange", ":"),
    "recall_unrestorable": ("darkred", "--"),
}


def _plot(result: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        fig.set_size_inches(12, 8)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        target = result["recall_target"]
        cr = result["timeline"]["client_recall"]
        if cr:
            top.plot(
                [c[0] for c in cr], [c[1] for c in cr], ".", ms=2, c="tab:blue", label="recall, client (exact check)"
            )
        sv = [s for s in result["timeline"]["server"] if s.get("recall") is not None]
        if sv:
            top.plot(
                [s["t"] for s in sv],
                [s["recall"] for s in sv],
                "-",
                lw=1,
                c="tab:purple",
                label="recall, server monitor",
            )
        loop = [s for s in result["timeline"]["server"] if s.get("target") is not None]
        if loop:
            top.step(
                [s["t"] for s in loop],
                [s["target"] for s in loop],
                where="post",
                lw=0.8,
                c="tab:red",
                label="the loop's target (/readyz)",
            )
        top.axhline(target, c="k", lw=0.8, ls="--", label=f"the bundle's target {target:g}")
        top.set_ylabel(f"recall@{result['k']}")
        ps = result["timeline"]["per_second"]
        t = [s["t"] for s in ps if s["p99_ms"] is not None]
        bottom.plot(
            t,
            [s["p99_ms"] for s in ps if s["p99_ms"] is not None],
            lw=0.8,
            c="tab:blue",
            label="p99 per second, client",
        )
        bottom.plot(
            t,
            [s["p50_ms"] for s in ps if s["p99_ms"] is not None],
            lw=0.6,
            c="tab:cyan",
            label="p50 per second, client",
        )
        win = [(s["t"], s["p99_window_ms"]) for s in ps if s.get("p99_window_ms") is not None]
        if win:
            bottom.plot(
                [w[0] for w in win],
                [w[1] for w in win],
                lw=1.4,
                c="tab:purple",
                label=f"p99 of the last {result['window_s']:g} s, client",
            )
        ann = [(s["t"], s["ann_p99_ms"]) for s in ps if s.get("ann_p99_ms") is not None]
        if ann:
            bottom.plot(
                [a[0] for a in ann], [a[1] for a in ann], lw=0.6, c="tab:gray", label="p99 per second, server ann stage"
            )
        fails = [s for s in ps if s["failed"]]
        if fails:
            bottom.scatter(
                [s["t"] for s in fails],
                [result["config"]["retune"]["max_p99_ms"]] * len(fails),
                marker="x",
                c="red",
                label="failures",
            )
        bottom.axhline(result["config"]["retune"]["max_p99_ms"], c="k", lw=0.8, ls="--", label="p99 budget")
        bottom.set_yscale("log")
        bottom.set_ylabel("ms")
        bottom.set_xlabel("seconds since the first request")
        for i, ph in enumerate(result["phases"]):
            for ax in (top, bottom):
                ax.axvline(ph["start_s"], c="tab:brown", lw=1.2)
            top.text(
                ph["start_s"],
                1.0 + 0.04 * (i % 2),  # alternate heights: a short phase's name does not run into the next
                " " + ph["name"],
                transform=top.get_xaxis_transform(),
                fontsize=8,
                va="bottom",
                c="tab:brown",
            )
            ing = ph.get("ingest")
            if ing:
                for ax in (top, bottom):
                    ax.axvspan(ing["start_s"], ing["end_s"], color="tab:brown", alpha=0.08)
        seen: set[str] = set()
        for a in result["actions"]:
            color, style = ACTION_STYLE.get(a["event"], ("tab:olive", ":"))
            label = a["event"] if a["event"] not in seen else None
            seen.add(a["event"])
            for ax in (top, bottom):
                ax.axvline(a["t"], c=color, ls=style, lw=1, label=label if ax is top else None)
        top.legend(loc="lower left", fontsize=7)
        bottom.legend(loc="upper left", fontsize=7)
        tg = result["targets"]
        top.set_title(
            f"drift: {result['items']:,} items {result['kind']} (dim {result['dim']}), k={result['k']}, "
            f"{result['rate']:g} req/s; re-tunes applied {tg['re-tunes applied']}, recall back after each shift "
            f"{tg['recall back at the target after each shift']}, p99 within budget "
            f"{tg['p99 of every window within the budget throughout']}",
            fontsize=9,
            pad=26,  # above the phase names (at 1.0 and 1.04 of the axes)
        )

    return draw


# ---- the command ----------------------------------------------------------------------------------------------


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "drift",
        help="a tuned bundle under a shifting query distribution: online recall, the live re-tune's actions "
        "and latency over time (JSON + PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 1_000_000, dim=64)
    p.add_argument(
        "--new-share",
        type=float,
        default=0.2,
        help="the new block posted live in the new_items phase, as a share of --items (default 0.2)",
    )
    add_kind(
        p, choices=("hnsw", "ivfpq", "scann"), what="of the served bundle (its search settings are what the loop tunes)"
    )
    add_recall(p, "the bundle is tuned to this recall@k: the loop's target")
    add_k(p, 100)
    p.add_argument(
        "--search-params",
        default=None,
        help="JSON search settings the bundle starts from instead of the tuned ones, e.g. '{\"ef\": 10}' (default "
        "none: as tuned); a setting under the target makes the loop act in the baseline",
    )
    p.add_argument(
        "--build-params",
        dest="build_params_json",
        default=None,
        help="JSON build parameters of the index, e.g. '{\"M\": 16}' (default none: the backend's)",
    )
    p.add_argument("--rate", type=float, default=50.0, help="query_vector requests/s, open loop (default 50)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections of the client (default 16)")
    p.add_argument(
        "--check-share",
        type=float,
        default=0.1,
        help="share of the answers the client checks against exact search (default 0.1)",
    )
    p.add_argument(
        "--window-s",
        type=float,
        default=20.0,
        help="the client's recall is the mean over the phase's checked answers of the last this many seconds "
        "(default 20); the p99 judged against the budget is over the same trailing window",
    )
    p.add_argument("--min-phase-s", type=float, default=120.0, help="shortest phase (default 120 s)")
    p.add_argument("--phase-s", type=float, default=600.0, help="longest phase: its time limit (default 600 s)")
    p.add_argument(
        "--hold-s",
        type=float,
        default=20.0,
        help="a phase ends once the recall has been at or over the target this long (default 20 s)",
    )
    p.add_argument(
        "--poll-s", type=float, default=2.0, help="how often the server's recall and state are read (default 2 s)"
    )
    p.add_argument("--insert-batch", type=int, default=50, help="new items per POST /v1/items (default 50)")
    p.add_argument("--insert-rate", type=float, default=1000.0, help="new items/s posted (default 1000)")
    g = p.add_argument_group("the server's [monitor] and [retune] settings")
    g.add_argument("--sample", type=float, default=0.2, help="[monitor] sample (default 0.2)")
    g.add_argument("--max-busy", type=float, default=0.25, help="[monitor] max_busy (default 0.25)")
    g.add_argument("--reservoir", type=int, default=2000, help="[monitor] reservoir (default 2000)")
    g.add_argument(
        "--reservoir-max-age-s",
        type=float,
        default=60.0,
        help="[monitor] reservoir_max_age_s (default 60: the reservoir follows the last minute of traffic)",
    )
    g.add_argument("--samples", type=int, default=200, help="[retune] samples (default 200)")
    g.add_argument("--confidence", type=float, default=0.95, help="[retune] confidence (default 0.95)")
    g.add_argument(
        "--max-p99-ms",
        type=float,
        default=DEFAULT_BUDGET_MS,
        help=f"[retune] max_p99_ms: the p99 budget (default {DEFAULT_BUDGET_MS:g}; another value is named in the "
        "report's file name)",
    )
    g.add_argument("--min-queries", type=int, default=200, help="[retune] min_queries (default 200)")
    g.add_argument("--margin", type=float, default=0.01, help="[retune] margin (default 0.01)")
    g.add_argument("--cooldown-s", type=float, default=60.0, help="[retune] cooldown_s (default 60)")
    add_seed(p, "catalog and query seed")
    add_workdir(p, "where the bundle is built once (reused) and each run's copy of it served")
    add_out(p)
    p.set_defaults(func=run)

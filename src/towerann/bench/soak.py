"""`towerann bench soak`: a real server under a steady mixed load for a fixed time, through one batch
refresh + hot swap and one crash of Redis; every acknowledged write is read back at the end.

Against `towerann serve` in a subprocess on loopback, with a private redis-server (appendonly yes,
everysec) holding the user features, the sessions and the delta log, as a durable deployment has them:
- an open-loop generator (bench serve's, in its own process) sends --rate requests/s for --duration s:
  reads (POST /v1/candidates), clicks (POST /v1/events, soak users, 40 clicks each at most so the
  session cap keeps them all) and item writes (POST /v1/items, one new item each, in soak categories
  of 500 items);
- at 35% of the run `refresh` rebuilds the bundle in a child process at nice 10 (re-embed the catalog
  plus the delta log, build, tune, publish) and POST /v1/admin/reload swaps it in (retried, as an
  operator would, while Redis is down);
- at 70%, whatever the rebuild is doing then, Redis is killed with SIGKILL and restarted on the same
  port --redis-down-s later: reads answer `degraded`, clicks and writes get 503 until it is back;
- afterwards every acknowledged item is looked for with a filtered request on its category (exact
  search: the category is small) and every acknowledged click in the user's session in Redis.
Reports statuses per kind inside and outside the Redis outage, latency percentiles per phase and per
second, the server's RSS over time, and the read-back; JSON + a PNG of latency and RSS over time.
What to look for: no 5xx outside the outage, no acknowledged write lost, RSS growth after warm-up
under 5% (reported over the whole run, and within each bundle's life, apart from the step the swap to
a rebuilt bundle brings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.options import add_catalog, add_k, add_kind, add_out, add_recall, add_seed, add_workdir
from towerann.bench.report import percentiles, write_report

TOKEN = "soak-token"
ITEMS_PER_CATEGORY = 500  # a soak category stays far below exact_below: its read-back is exact
CLICKS_PER_USER = 40  # below [features] max_events (50): the session keeps every acknowledged click
FIRST_ITEM_ID = 30_000_000_000
KINDS = ("read", "click", "write")


def _plan(
    n: int,
    mix: tuple[float, float, float],
    user_ids: list[str],
    item_ids: list[int],
    rows: list[dict[str, Any]],
    k: int,
    seed: int,
) -> tuple[list[Any], np.ndarray, list[Any]]:
    """The n requests of the run: (bodies for the generator, kind per request, what each wrote)."""
    rng = np.random.default_rng(seed)
    p = np.asarray(mix, float) / sum(mix)
    kinds = rng.choice(3, size=n, p=p)
    bodies: list[Any] = []
    wrote: list[Any] = []
    clicks = writes = 0
    for kind in kinds:
        if kind == 0:
            bodies.append(json.dumps({"user_id": user_ids[rng.integers(len(user_ids))], "k": k}).encode())
            wrote.append(None)
        elif kind == 1:
            user, item = f"soak-u{clicks // CLICKS_PER_USER}", item_ids[clicks % len(item_ids)]
            bodies.append(("/v1/events", json.dumps({"user_id": user, "item_id": str(item), "type": "click"}).encode()))
            wrote.append((user, item))
            clicks += 1
        else:
            item_id = FIRST_ITEM_ID + writes
            row = {
                **rows[writes % len(rows)],
                "item_id": str(item_id),
                "available": True,
                "category": f"soak_{writes // ITEMS_PER_CATEGORY}",
            }
            bodies.append(("/v1/items", json.dumps({"items": [row]}).encode()))
            wrote.append((row["category"], item_id))
            writes += 1
    return bodies, kinds, wrote


class _Redis:
    """The private redis-server: killed (SIGKILL, no shutdown save) and started again on its port."""

    def __init__(self, workdir: Path):
        from towerann.bench.serve import start_redis

        self.workdir = workdir
        self.proc, self.url = start_redis(workdir)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def start(self) -> None:
        from towerann.bench.serve import start_redis

        self.proc, _ = start_redis(self.workdir, self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _read_back(url: str, redis_url: str, kinds: np.ndarray, wrote: list[Any], status: np.ndarray) -> dict[str, Any]:
    """Every acknowledged (200) write must be there: items through the API, clicks in Redis."""
    import httpx

    from towerann.features import open_store

    acked = [(int(kind), wrote[i]) for i, kind in enumerate(kinds) if status[i] == 200 and kind > 0]
    items: dict[str, set[int]] = {}
    clicks: dict[str, set[int]] = {}
    for kind, (key, item) in acked:
        (clicks if kind == 1 else items).setdefault(key, set()).add(item)
    lost_items, lost_clicks = [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        for category, ids in items.items():
            got = http.post(
                "/v1/candidates", json={"user_id": "soak-reader", "k": 1000, "filter": {"categories": [category]}}
            )
            got.raise_for_status()
            lost_items += sorted(ids - {c["item_id"] for c in got.json()["candidates"]})
    store = open_store(redis_url)
    try:
        for user, ids in clicks.items():
            session = {int(e.item_id) for e in store.get_one(user).session}
            lost_clicks += [(user, i) for i in sorted(ids - session)]
    finally:
        store.close()
    return {
        "items_acknowledged": sum(len(v) for v in items.values()),
        "items_lost": len(lost_items),
        "clicks_acknowledged": sum(len(v) for v in clicks.values()),
        "clicks_lost": len(lost_clicks),
        "lost_examples": [str(x) for x in (lost_items + lost_clicks)[:10]],
    }


def _statuses(kinds: np.ndarray, status: np.ndarray, sel: np.ndarray) -> dict[str, dict[str, int]]:
    """{kind: {status: count}} over the selected requests (status 0: no answer, connection failed)."""
    return {
        name: {str(s): int(c) for s, c in sorted(Counter(status[sel & (kinds == i)].tolist()).items())}
        for i, name in enumerate(KINDS)
    }


def _per_second(sent: np.ndarray, lat: np.ndarray, status: np.ndarray, t0: float) -> list[dict[str, Any]]:
    out = []
    sec = np.floor(sent - t0).astype(int)
    for s in range(int(sec.max()) + 1 if len(sec) else 0):
        sel = sec == s
        ok = sel & (status == 200)
        out.append(
            {
                "t": s,
                "sent": int(sel.sum()),
                "ok": int(ok.sum()),
                "failed": int((sel & ~ok).sum()),
                "p50_ms": round(float(np.median(lat[ok])), 3) if ok.any() else None,
                "p99_ms": round(float(np.percentile(lat[ok], 99)), 3) if ok.any() else None,
            }
        )
    return out


def _rss_growth(rss: list[tuple[float, float]], start: float, end: float, until: float, tail: float) -> dict[str, Any]:
    """Median RSS over [start, end) against the median over the `tail` seconds before `until`."""
    t = np.array([x for x, _ in rss])
    m = np.array([y for _, y in rss])
    base, last = m[(t >= start) & (t < end)], m[(t >= until - tail) & (t <= until)]
    if not len(base) or not len(last):
        return {"baseline_mb": None, "end_mb": None, "growth": None}
    b, e = float(np.median(base)), float(np.median(last))
    return {"baseline_mb": round(b, 1), "end_mb": round(e, 1), "growth": round(e / b - 1, 4)}


def run(args: argparse.Namespace) -> int:
    import httpx

    from towerann.bench.freshness import RssSampler, rebuild_niced, rss_mb
    from towerann.bench.serve import prepare, run_load
    from towerann.data.dataset import read_items
    from towerann.features import open_store
    from towerann.features.loader import load_dataset_features
    from towerann.freshness.publish import publish_bundle
    from towerann.index.build import Tuning
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel
    from towerann.server.server import start_subprocess

    work = Path(args.workdir) / f"serve-{args.items}"
    paths = prepare(work, args.items, args.users, dim=args.dim, epochs=1, publish=False)
    root, redis_dir = work / "soak-indexes", work / "soak-redis"
    for d in (root, redis_dir):
        shutil.rmtree(d, ignore_errors=True)
    redis_dir.mkdir(parents=True)
    t_build = time.perf_counter()
    tuning = None
    if args.recall:
        queries = heldout_user_queries(TwoTowerModel.load(paths["model"]), paths["data"], 1000)
        tuning = Tuning(queries, args.k, args.recall)
    publish_bundle(root, paths["model"], paths["vectors"], kind=args.kind, tuning=tuning)
    print(f"{args.kind} bundle over {args.items} items built in {time.perf_counter() - t_build:.1f}s", flush=True)

    redis = _Redis(redis_dir)
    server = None
    try:
        store = open_store(redis.url)
        load_dataset_features(store, paths["data"])
        store.close()
        (work / "soak-token").write_text(TOKEN)
        toml = work / "soak.toml"
        toml.write_text(
            f'[paths]\nindex = "{root}"\ndata = "{paths["data"]}"\n[features]\nstore = "{redis.url}"\n'
            f'[freshness]\ntoken_file = "{work / "soak-token"}"\npoll_s = 0.0\n'
        )
        catalog = read_items(paths["data"]).head(2000)
        rows = [{c: (v.item() if hasattr(v, "item") else v) for c, v in r.items()} for r in catalog.to_dict("records")]
        item_ids = [int(r["item_id"]) for r in rows]
        user_ids = [str(u) for u in range(args.users)]
        n = max(1, int(args.rate * args.duration))
        bodies, kinds, wrote = _plan(n, tuple(args.mix), user_ids, item_ids, rows, args.k, args.seed)

        server = start_subprocess(root, redis.url, config=toml, timeout_s=600)
        assert server.process is not None  # start_subprocess's handle always has its child
        pid = server.process.pid
        sampler = RssSampler(pid, 0.5).start()
        load_out: dict[str, Any] = {}
        loader = threading.Thread(
            target=lambda: load_out.update(
                run_load(
                    server.url,
                    bodies,
                    args.rate,
                    args.duration,
                    args.connections,
                    timeline=True,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            ),
            daemon=True,
        )
        t0 = time.time()
        loader.start()
        events: dict[str, float] = {}
        swap: dict[str, Any] = {}
        rebuilt: dict[str, Any] = {}
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def refresh_and_swap() -> None:
            """The batch rebuild at 35%, then the reload; an operator retries a reload that met Redis down."""
            time.sleep(max(0.0, t0 + 0.35 * args.duration - time.time()))
            events["refresh_start"] = time.time()
            rebuilt.update(
                rebuild_niced(
                    paths["data"],
                    paths["model"],
                    root,
                    None,
                    args.kind,
                    args.recall or None,
                    args.k,
                    delta_url=redis.url,
                )
            )
            events["swap_start"] = time.time()
            with httpx.Client(base_url=server.url, timeout=120, headers=auth) as http:
                for attempt in range(1, 121):
                    r = http.post("/v1/admin/reload")
                    swap.update(r.json(), attempts=attempt)
                    if r.status_code == 200:
                        break
                    time.sleep(1.0)
            events["swap_end"] = time.time()
            print(
                f"refresh in {rebuilt['seconds']:.1f}s, reload: {swap.get('outcome')} (attempt {swap['attempts']})",
                flush=True,
            )

        swapper = threading.Thread(target=refresh_and_swap, daemon=True)
        swapper.start()
        with httpx.Client(base_url=server.url, timeout=120) as http:
            time.sleep(max(0.0, t0 + 0.7 * args.duration - time.time()))
            events["redis_kill"] = time.time()
            redis.kill()
            time.sleep(args.redis_down_s)
            redis.start()
            events["redis_started"] = time.time()
            while time.time() - events["redis_started"] < 60:
                if http.get("/readyz").json().get("dependencies", {}) == {"features": "up", "delta_log": "up"}:
                    break
                time.sleep(0.05)
            events["redis_ready"] = time.time()
            print(
                f"redis killed, restarted after {args.redis_down_s}s, server ready again "
                f"{events['redis_ready'] - events['redis_started']:.2f}s later",
                flush=True,
            )
        loader.join()
        swapper.join()
        rss = sampler.stop()
        tl = load_out["timeline"]
        status = np.asarray(tl["status"])
        readback = _read_back(server.url, redis.url, kinds[: len(status)], wrote, status)
        peak_mb = rss_mb(pid)[1]
    finally:
        if server is not None:
            server.stop()
        redis.stop()

    sent, lat = np.asarray(tl["sent_unix"]), np.asarray(tl["latency_ms"])
    kinds = kinds[: len(status)]
    # The outage: from the kill until the server reads Redis again - the first click or write it acknowledged
    # after Redis was ready (on a busy machine that can be later than ready + the store's 1 s retry window).
    written = np.isin(np.asarray(kinds), ("click", "write")) & (status == 200) & (sent >= events["redis_ready"])
    events["redis_read_again"] = float(sent[written].min()) if written.any() else events["redis_ready"]
    outage = (events["redis_kill"], max(events["redis_ready"] + 1.0, events["redis_read_again"]))
    inside = (sent >= outage[0]) & (sent < outage[1])
    server_errors = (status >= 500) | (status == 0)
    warm = t0 + 0.15 * args.duration
    swapping = (sent >= events["refresh_start"]) & (sent < events["swap_end"] + 1.0)
    ok = status == 200

    def latency(sel: np.ndarray) -> dict[str, Any]:
        return {**percentiles(lat[sel & ok] / 1e3), "failed": int((sel & ~ok).sum())}

    load_end = float(sent[-1])
    result: dict[str, Any] = {
        "items": args.items,
        "index": args.kind,
        "k": args.k,
        "rate": args.rate,
        "duration_s": args.duration,
        "mix": dict(zip(KINDS, args.mix)),
        "sent": int(len(status)),
        "achieved_rps": load_out["achieved_rps"],
        "events": {k: round(v - t0, 3) for k, v in events.items()},
        "refresh": rebuilt,
        "reload": swap,
        "swap_under_load": events["swap_end"] < load_end,
        "outage_under_load": events["redis_ready"] < load_end,
        "statuses_outside_outage": _statuses(kinds, status, ~inside),
        "statuses_during_outage": _statuses(kinds, status, inside),
        "server_errors_outside_outage": int((server_errors & ~inside).sum()),
        "degraded_reads": {
            "outside_outage": int((np.asarray(tl["degraded"]) & ~inside).sum()),
            "during_outage": int((np.asarray(tl["degraded"]) & inside).sum()),
        },
        "latency": {
            "steady": latency((sent >= warm) & ~swapping & ~inside),
            "during_refresh": latency((sent >= events["refresh_start"]) & (sent < events["swap_start"])),
            "during_swap": latency((sent >= events["swap_start"]) & (sent < events["swap_end"] + 1.0)),
            "during_redis_outage": latency(inside),
            "per_kind": {name: percentiles(lat[(kinds == i) & ok] / 1e3) for i, name in enumerate(KINDS)},
        },
        # Whole run (warm-up to end, the swap to the rebuilt bundle included), and within each bundle's life:
        # growth that a leak would show, apart from the step a bundle of another size brings.
        "rss": {
            "after_warmup": _rss_growth(rss, warm, warm + 0.15 * args.duration, rss[-1][0], 0.1 * args.duration),
            "before_swap": _rss_growth(
                rss, warm, warm + 0.15 * args.duration, events["refresh_start"], 0.1 * args.duration
            ),
            "after_swap": _rss_growth(
                rss,
                events["swap_end"] + 2.0,
                events["swap_end"] + 2.0 + 0.1 * args.duration,
                rss[-1][0],
                0.1 * args.duration,
            ),
            "peak_mb": round(peak_mb, 1),
        },
        "readback": readback,
        "per_second": _per_second(sent, lat, status, t0),
        "rss_timeline": [[round(t - t0, 2), round(m, 1)] for t, m in rss],
    }
    growth = result["rss"]["after_warmup"]["growth"]
    within = [result["rss"][w]["growth"] for w in ("before_swap", "after_swap")]
    result["targets"] = {
        "no 5xx outside the Redis outage": result["server_errors_outside_outage"] == 0,
        "no acknowledged write lost": readback["items_lost"] == 0 and readback["clicks_lost"] == 0,
        "RSS growth after warm-up < 5%": growth is not None and growth < 0.05,
        "RSS growth within a bundle's life < 5%": all(g is not None and g < 0.05 for g in within),
    }
    json_path, png_path = write_report(
        args.out,
        f"soak-{args.items}-{args.kind}-{int(args.duration)}s",
        result,
        _plot(result, sent - t0, lat, status, kinds),
    )
    s = result
    print(
        f"soak {args.duration:.0f}s at {args.rate:.0f}/s ({s['sent']} requests, achieved {s['achieved_rps']:.0f}/s): "
        f"5xx outside the Redis outage {s['server_errors_outside_outage']}; during it {s['statuses_during_outage']}; "
        f"p99 steady {s['latency']['steady']['p99_ms']:.1f} ms, during the outage "
        f"{s['latency']['during_redis_outage']['p99_ms']:.1f} ms; lost items {readback['items_lost']} of "
        f"{readback['items_acknowledged']}, clicks {readback['clicks_lost']} of {readback['clicks_acknowledged']}; "
        f"RSS growth after warm-up {growth} (within a bundle: before the swap {within[0]}, after it {within[1]})",
        flush=True,
    )
    print(f"targets: {result['targets']}\nwrote {json_path} and {png_path}")
    return 0 if all(result["targets"].values()) or not args.check else 1


def _plot(result: dict[str, Any], t: np.ndarray, lat: np.ndarray, status: np.ndarray, kinds: np.ndarray) -> Any:
    from towerann.bench.freshness import plot_rss

    def draw(fig: Any) -> None:
        ax = fig.subplots(1, 1)
        for i, name in enumerate(KINDS):
            ok = (kinds == i) & (status == 200)
            ax.scatter(t[ok], lat[ok], s=2, label=f"{name} (ms)")
        bad = status != 200
        if bad.any():
            ax.scatter(
                t[bad],
                np.full(bad.sum(), max(1.0, float(lat[~bad].max()) if (~bad).any() else 1.0)),
                s=6,
                c="red",
                marker="x",
                label=f"not 200 ({int(bad.sum())})",
            )
        ev = result["events"]
        ax.axvspan(ev["refresh_start"], ev["swap_start"], alpha=0.12, color="gray", label="refresh (rebuild)")
        ax.axvspan(ev["swap_start"], ev["swap_end"], alpha=0.3, color="orange", label="reload + swap")
        ax.axvspan(ev["redis_kill"], ev["redis_ready"], alpha=0.25, color="red", label="Redis killed -> ready")
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency, ms")
        ax2 = plot_rss(ax, result["rss_timeline"])
        rb = result["readback"]
        ax.set_title(
            f"soak: {result['items']} items {result['index']}, {result['rate']:.0f} req/s for "
            f"{result['duration_s']:.0f}s; 5xx outside outage {result['server_errors_outside_outage']}, "
            f"lost writes {rb['items_lost'] + rb['clicks_lost']}",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=7, markerscale=3)
        ax2.legend(loc="upper right", fontsize=7)

    return draw


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "soak",
        help="mixed load for a fixed time through a refresh + swap and a Redis crash; "
        "errors, latency and RSS over time, every acknowledged write read back (JSON + PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 200_000, users=20_000, dim=64, trained=True)
    add_kind(p)
    add_recall(p, "both bundles are tuned to this recall@k", note="; 0 = no tuning")
    add_k(p, 100, "candidates per read")
    p.add_argument("--rate", type=float, default=200.0, help="requests/s, all kinds together (default 200)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument(
        "--mix",
        type=float,
        nargs=3,
        default=[0.7, 0.2, 0.1],
        metavar=("READS", "CLICKS", "WRITES"),
        help="shares of reads, clicks and item writes (default 0.7 0.2 0.1)",
    )
    p.add_argument("--redis-down-s", type=float, default=2.0, help="seconds Redis stays down (default 2)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections of the generator (default 32)")
    add_seed(p, "seed of the request mix")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    add_workdir(p)
    add_out(p)
    p.set_defaults(func=run)

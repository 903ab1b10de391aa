"""`towerann bench freshness`: new items at once, bulk inserts, and a hot swap under steady load.

Against a real `towerann serve` in a subprocess over loopback HTTP, on an HNSW bundle (default 1M
items, the `bench serve` workload, cached under --workdir):
1. new item: POST /v1/items with one item, then the very next /v1/candidates (filtered to the
   bench's own new category, so the answer is exact) must return it - latency of the write alone
   (acknowledged = searchable) and of write + check, p50/p99;
2. bulk: POST /v1/items with --bulk-batch items per call, items/s into the live index;
3. hot swap: an open-loop generator sends --rate requests/s while `refresh` rebuilds the bundle
   (re-embed + index build, in a child process at nice 10) and, --settle-s later, POST
   /v1/admin/reload swaps it in; failed requests, p99 steady (before the rebuild and after the
   swap) / during the rebuild / during the swap, and the server's RSS over time (two bundles live
   at once only during the swap). JSON + a PNG of latency over time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from towerann.bench.options import add_catalog, add_k, add_kind, add_out, add_recall, add_workdir
from towerann.bench.report import percentiles, write_report
from towerann.errors import ConfigError

TOKEN = "bench-token"
NEW_CATEGORY = "bench_new"


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def host_sample(pid: int) -> list[float]:
    """What a stall may come from, now: the process's major page faults so far (a page it maps read
    back from disk), the machine's runnable tasks, and its dirty and under-writeback page cache (MiB)."""
    majflt = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[9])
    running = next(
        int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("procs_running")
    )
    mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return [majflt, running, round(mem["Dirty"] / 1024, 1), round(mem["Writeback"] / 1024, 1)]


HOST_FIELDS = ["unix_s", "majflt", "procs_running", "dirty_mb", "writeback_mb"]


class RssSampler:
    """A thread sampling a process's RSS (MiB) every `every_s` into `samples` [(unix s, MiB)], and beside
    it `host` [unix s, *host_sample], until stop()."""

    def __init__(self, pid: int, every_s: float):
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.host: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self.samples.append((now, rss_mb(self.pid)[0]))
            self.host.append([round(now, 2), *host_sample(self.pid)])
            time.sleep(self.every_s)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def plot_rss(ax: Any, rss_timeline: list[list[float]], t0: float = 0.0) -> Any:
    """The server's RSS over time on a second y axis of `ax`; returns that axis."""
    ax2 = ax.twinx()
    rss = np.asarray(rss_timeline) if rss_timeline else np.zeros((0, 2))
    if len(rss):
        ax2.plot(rss[:, 0] - t0, rss[:, 1], c="green", lw=1, label="server RSS (MiB)")
    ax2.set_ylabel("server RSS, MiB")
    return ax2


def window(timeline: dict[str, list], *spans: tuple[float, float]) -> dict[str, Any]:
    """Latency percentiles and failures of the requests sent within the given (start, end) spans."""
    sent, lat, status = (np.asarray(timeline[k]) for k in ("sent_unix", "latency_ms", "status"))
    sel = np.zeros(len(sent), bool)
    for start, end in spans:
        sel |= (sent >= start) & (sent < end)
    ok = sel & (status == 200)
    return {**percentiles(lat[ok] / 1e3), "failed": int((sel & (status != 200)).sum()), "spans": spans}


def worst_request(timeline: dict[str, list], span: tuple[float, float], reload: dict[str, Any]) -> dict[str, Any]:
    """The slowest request sent within `span`: its latency, when it was sent (seconds after the reload
    began, on this machine's clock) and the reload phase running then - where a stall starts, since a
    request waits from its send time until the stall ends."""
    sent, lat, status = (np.asarray(timeline[k]) for k in ("sent_unix", "latency_ms", "status"))
    sel = np.flatnonzero((sent >= span[0]) & (sent < span[1]) & (status == 200))
    if not len(sel):
        return {}
    i = int(sel[np.argmax(lat[sel])])
    out: dict[str, Any] = {"latency_ms": float(lat[i]), "sent_unix": float(sent[i])}
    start = reload.get("phases_start_unix")
    if start is not None:
        out["after_reload_start_s"] = round(float(sent[i]) - start, 3)
        t, out["phase"] = start, "after" if sent[i] >= start else "before"
        for name, seconds in (reload.get("phases_s") or {}).items():
            if t <= sent[i] < t + seconds:
                out["phase"] = name
                break
            t += seconds
    return out


REBUILD_NICE = 10  # the rebuild shares the server's 2 cores: it runs as the background job it is


def _refresh_main(
    data: Path,
    model: Path,
    root: Path,
    delta_url: str,
    delta_path: Path | None,
    kind: str,
    recall: float | None,
    k: int,
    out: Any,
) -> None:
    import os

    from towerann.freshness.deltalog import open_delta_log
    from towerann.freshness.refresh import refresh

    os.nice(REBUILD_NICE)
    delta = open_delta_log(delta_url, delta_path)
    try:
        out.put(refresh(data, model, root, delta, kind=kind, recall=recall, k=k, progress=False))
    finally:
        delta.close()


def rebuild_niced(
    data: Path,
    model: Path,
    root: Path,
    delta_path: Path | None,
    kind: str,
    recall: float | None,
    k: int,
    delta_url: str = "embedded",
) -> dict[str, Any]:
    """`refresh` in a child process at nice 10, as a cron job beside a server would run (`recall`: None for no
    tuning). The delta log: "embedded" (SQLite at delta_path) or a Redis URL."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_refresh_main, args=(data, model, root, delta_url, delta_path, kind, recall, k, q))
    p.start()
    try:
        return q.get(timeout=3600)
    finally:
        p.join(timeout=60)


def run(args: argparse.Namespace) -> int:
    import httpx

    from towerann.bench.serve import prepare, run_load
    from towerann.data.dataset import read_items
    from towerann.freshness.publish import publish_bundle
    from towerann.index.build import Tuning
    from towerann.index.snapshot import resolve, set_current
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel
    from towerann.server.server import start_subprocess

    work = Path(args.workdir) / f"serve-{args.items}"
    paths = prepare(work, args.items, args.users, dim=args.dim, epochs=1, publish=False)  # data, model, vectors
    root, delta_path = work / "fresh-indexes", work / "fresh-delta.sqlite"
    shutil.rmtree(root, ignore_errors=True)
    delta_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    # Tuned like a real deployment (and like the rebuild below): an untuned index would fail the
    # swap's recall validation, which is the point of that check.
    queries = heldout_user_queries(TwoTowerModel.load(paths["model"]), paths["data"], 1000)
    publish_bundle(root, paths["model"], paths["vectors"], kind=args.kind, tuning=Tuning(queries, args.k, args.recall))
    build_s = time.perf_counter() - t0
    print(f"initial {args.kind} bundle over {args.items} items built and tuned in {build_s:.1f}s", flush=True)
    (work / "token").write_text(TOKEN)
    toml = work / "fresh.toml"
    toml.write_text(
        f'[serve]\nmax_body_bytes = {64 << 20}\n[paths]\nindex = "{root}"\ndata = "{paths["data"]}"\n'
        f'[features]\nstore = "memory"\n[freshness]\ndelta_path = "{delta_path}"\n'
        f'token_file = "{work / "token"}"\npoll_s = 0.0\n'
    )
    template = read_items(paths["data"]).head(args.bulk_batch * args.bulk_calls + args.new_items)
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in template.to_dict("records")]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    result: dict[str, Any] = {"items": args.items, "index": args.kind, "initial_build_s": round(build_s, 1)}

    server = start_subprocess(root, "memory", config=toml, timeout_s=600)
    assert server.process is not None  # start_subprocess's handle always has its child
    pid = server.process.pid
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            # 1. one new item per call, then the very next request must return it
            write_ms, visible_ms, missing = [], [], 0
            for i in range(args.new_items):
                item = {**rows[i], "item_id": str(10_000_000_000 + i), "category": NEW_CATEGORY, "available": True}
                t = time.perf_counter()
                http.post("/v1/items", json={"items": [item]}, headers=auth).raise_for_status()
                write_ms.append((time.perf_counter() - t) * 1e3)
                got = http.post(
                    "/v1/candidates",
                    json={"user_id": "bench", "k": min(1000, i + 1), "filter": {"categories": [NEW_CATEGORY]}},
                ).json()
                visible_ms.append((time.perf_counter() - t) * 1e3)
                missing += int(item["item_id"]) not in {c["item_id"] for c in got["candidates"]}
            result["new_item"] = {
                "write": percentiles(np.array(write_ms) / 1e3),
                "write_then_found": percentiles(np.array(visible_ms) / 1e3),
                "not_found_by_next_request": missing,
            }
            print(
                f"new item: write p50 {np.median(write_ms):.2f} ms p99 {np.percentile(write_ms, 99):.2f} ms; "
                f"not found by the next request: {missing}",
                flush=True,
            )

            # 2. bulk upserts into the live index
            t = time.perf_counter()
            base = args.new_items
            for c in range(args.bulk_calls):
                chunk = rows[base + c * args.bulk_batch : base + (c + 1) * args.bulk_batch]
                body = [
                    {**r, "item_id": str(20_000_000_000 + base + c * args.bulk_batch + j)} for j, r in enumerate(chunk)
                ]
                http.post("/v1/items", json={"items": body}, headers=auth).raise_for_status()
            bulk_s = time.perf_counter() - t
            n_bulk = args.bulk_calls * args.bulk_batch
            result["bulk"] = {
                "items": n_bulk,
                "batch": args.bulk_batch,
                "seconds": round(bulk_s, 3),
                "items_per_s": round(n_bulk / bulk_s, 1),
            }
            print(f"bulk: {n_bulk} items in {bulk_s:.2f}s = {n_bulk / bulk_s:.0f} items/s", flush=True)

            # 3. hot swap under a steady request rate
            sampler = RssSampler(pid, 0.1).start()
            bodies = [json.dumps({"user_id": str(u), "k": args.k}).encode() for u in range(5000)]
            load_out: dict[str, Any] = {}
            duration = (
                args.steady_s * 2 + args.swap_budget_s + (args.swaps - 1 + bool(args.control)) * (args.swap_gap_s + 10)
            )
            loader = threading.Thread(
                target=lambda: load_out.update(run_load(server.url, bodies, args.rate, duration, 16, timeline=True)),
                daemon=True,
            )
            loader.start()
            time.sleep(args.steady_s)
            events: dict[str, float] = {"rebuild_start": time.time()}
            rebuilt = rebuild_niced(paths["data"], paths["model"], root, delta_path, args.kind, args.recall, args.k)
            events["rebuild_end"] = time.time()
            time.sleep(args.settle_s)  # a watcher polling CURRENT would notice it a little later, too
            control = None
            if args.control:  # the control: another process does to the machine what the load does, no swap
                control = {"kind": args.control, "start": time.time()}
                control["seconds"] = run_control(args.control, resolve(root))
                control["end"] = time.time()
                time.sleep(args.swap_gap_s)
            events["swap_start"] = time.time()
            swap = http.post("/v1/admin/reload", headers=auth).json()
            events["swap_end"] = time.time()
            # --swaps N: N-1 more swaps, each to a copy of the rebuilt bundle (its files fresh in the page
            # cache, as a rebuild leaves them), --swap-gap-s apart: the five runs of the target in one load
            swaps = [{"start": events["swap_start"], "end": events["swap_end"], "reload": swap}]
            rebuilt_dir = resolve(root)
            for again in range(1, args.swaps):
                time.sleep(args.swap_gap_s)
                copy = root / f"{rebuilt_dir.name}-again{again}"
                shutil.copytree(rebuilt_dir, copy)
                set_current(root, copy.name)
                t_swap = time.time()
                info = http.post("/v1/admin/reload", headers=auth).json()
                swaps.append({"start": t_swap, "end": time.time(), "reload": info})
            loader.join()
            rss = sampler.stop()
    finally:
        peak_mb = rss_mb(pid)[1]
        server.stop()
    tl = load_out["timeline"]
    short = load_shortfall_s(tl, swaps[-1]["end"], args.steady_s)
    if short > 0:
        raise ConfigError(
            f"the load ended {short:.0f}s before the swaps were measured (the rebuild took "
            f"{rebuilt['seconds']:.0f}s): run again with --swap-budget-s {int(args.swap_budget_s + short) + 30}"
        )
    before = (tl["sent_unix"][0] + 2.0, events["rebuild_start"])
    after = (swaps[-1]["end"] + 1.0, tl["sent_unix"][-1] + 1.0)
    # Steady = no rebuild and no swap running: before the rebuild and after the swap, together, so one
    # hiccup of the machine in a ~13 s window does not set the baseline.
    steady = window(tl, before, after)
    during_swap = window(tl, (events["swap_start"] - 0.5, events["swap_end"] + 1.0))
    result["swap"] = {
        "rate": args.rate,
        "reload": swap,
        "refresh": {**rebuilt, "nice": REBUILD_NICE},
        "events": events,
        "failed_requests": int(sum(1 for s in tl["status"] if s != 200)),
        "sent": len(tl["status"]),
        "steady": steady,
        "before": window(tl, before),
        "during_rebuild": window(tl, (events["rebuild_start"], events["swap_start"])),
        "during_swap": during_swap,
        "after": window(tl, after),
        "p99_swap_over_steady": round(during_swap["p99_ms"] / steady["p99_ms"], 2),
        "worst_request": worst_request(tl, during_swap["spans"][0], swap),
        "swaps": [_swap_window(tl, sw, steady) for sw in swaps],
        "control": None if control is None else {**control, **_swap_window(tl, {**control, "reload": {}}, steady)},
        "rss_mb_before": round(max((m for t, m in rss if t < events["rebuild_start"]), default=0.0), 1),
        "rss_mb_peak_during_swap": round(
            max((m for t, m in rss if events["swap_start"] <= t <= events["swap_end"] + 1), default=0.0), 1
        ),
        "rss_mb_after": round(rss[-1][1], 1) if rss else 0.0,
        "rss_mb_peak_process": round(peak_mb, 1),
    }
    s = result["swap"]
    print(
        f"swap under {args.rate}/s: {s['failed_requests']} failed of {s['sent']}; "
        f"p99 steady {steady['p99_ms']:.2f} ms, "
        f"during swap {during_swap['p99_ms']:.2f} ms ({s['p99_swap_over_steady']}x); RSS {s['rss_mb_before']} -> "
        f"peak {s['rss_mb_peak_during_swap']} -> {s['rss_mb_after']} MiB; reload {swap.get('outcome')} in "
        f"{swap.get('seconds')}s",
        flush=True,
    )
    for n, sw in enumerate(s["swaps"]):
        w = sw["worst_request"]
        print(
            f"  swap {n + 1}: p99 {sw['p99_ms']:.2f} ms ({sw['p99_over_steady']}x steady), "
            f"worst {w.get('latency_ms', 0):.1f} ms "
            f"sent {w.get('after_reload_start_s', float('nan')):.2f}s into the reload (phase {w.get('phase')}); "
            f"phases {sw['phases_s']}",
            flush=True,
        )
    if s["control"] is not None:
        c = s["control"]
        print(
            f"  control ({c['kind']}, {c['seconds']:.2f}s, no swap): p99 {c['p99_ms']:.2f} ms ({c['p99_over_steady']}x "
            f"steady), worst {c['worst_request'].get('latency_ms', 0):.1f} ms",
            flush=True,
        )
    result["rss_timeline"] = [[round(t, 2), round(m, 1)] for t, m in rss]
    result["host_timeline"] = {"fields": HOST_FIELDS, "rows": sampler.host}
    result["timeline"] = tl
    json_path, png_path = write_report(args.out, f"freshness-{args.items}-{args.kind}", result, _plot(result))
    print(f"wrote {json_path} and {png_path}")
    return 0


def load_shortfall_s(timeline: dict[str, list], swaps_end: float, steady_s: float) -> float:
    """Seconds the load would have needed to run longer to cover the last swap's window and half a
    steady window after it; 0 when it did. The load's length is fixed in advance, and a rebuild slower
    than --swap-budget-s leaves the swaps with no requests to measure (nan), which must not pass for a result."""
    return max(0.0, swaps_end + 1.0 + steady_s / 2 - timeline["sent_unix"][-1])


CONTROL_SCRIPTS = {
    # read and checksum every file of the bundle, in 1 MB blocks, as a load's verification does
    "read": "import hashlib,pathlib,sys\nfor p in sorted(pathlib.Path(sys.argv[1]).rglob('*')):\n"
    "    if p.is_file():\n        h, f = hashlib.sha256(), open(p, 'rb')\n"
    "        while b := f.read(1 << 20): h.update(b)\n",
    # allocate and touch as much anonymous memory as the bundle's files hold (what a load adds to the RSS)
    "alloc": "import numpy as np,pathlib,sys\n"
    "n = sum(p.stat().st_size for p in pathlib.Path(sys.argv[1]).rglob('*') if p.is_file())\n"
    "a = np.ones(n, np.uint8); print(int(a[::4096].sum()))\n",
}


def run_control(kind: str, bundle_dir: Path) -> float:
    """Run one control process on `bundle_dir` (CONTROL_SCRIPTS) to its end; return its seconds."""
    import subprocess
    import sys

    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", CONTROL_SCRIPTS[kind], str(bundle_dir)], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t


def _swap_window(timeline: dict[str, list], swap: dict[str, Any], steady: dict[str, Any]) -> dict[str, Any]:
    """One swap's window (0.5 s before the reload call to 1 s after it answered): p99 vs steady, the worst request."""
    w = window(timeline, (swap["start"] - 0.5, swap["end"] + 1.0))
    return {
        "p99_ms": w["p99_ms"],
        "p99_over_steady": round(w["p99_ms"] / steady["p99_ms"], 2),
        "failed": w["failed"],
        "outcome": swap["reload"].get("outcome"),
        "phases_s": swap["reload"].get("phases_s"),
        "worst_request": worst_request(timeline, w["spans"][0], swap["reload"]),
    }


def _plot(result: dict[str, Any]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots(1, 1)
        tl, ev = result["timeline"], result["swap"]["events"]
        t0 = tl["sent_unix"][0]
        sent = np.asarray(tl["sent_unix"]) - t0
        lat = np.asarray(tl["latency_ms"])
        ok = np.asarray(tl["status"]) == 200
        ax.scatter(sent[ok], lat[ok], s=3, label="request latency (ms)")
        if (~ok).any():
            ax.scatter(sent[~ok], np.full((~ok).sum(), lat[ok].max() if ok.any() else 1), s=8, c="red", label="failed")
        ax.axvspan(ev["rebuild_start"] - t0, ev["swap_start"] - t0, alpha=0.15, color="gray", label="rebuild (refresh)")
        ax.axvspan(
            ev["swap_start"] - t0, ev["swap_end"] - t0, alpha=0.3, color="orange", label="load + validate + swap"
        )
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("ms")
        ax2 = plot_rss(ax, result["rss_timeline"], t0)
        s = result["swap"]
        ax.set_title(
            f"hot swap, {result['items']} items {result['index']}, {s['rate']:.0f} req/s: "
            f"{s['failed_requests']} failed, p99 swap/steady {s['p99_swap_over_steady']}x"
        )
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)

    return draw


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "freshness",
        help="new-item latency, bulk inserts, hot swap under load (JSON + PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 1_000_000, users=20_000, dim=128, trained=True)
    add_kind(p)
    p.add_argument("--new-items", type=int, default=300, help="single-item writes measured (default 300)")
    p.add_argument("--bulk-batch", type=int, default=1000, help="items per bulk call (default 1000)")
    p.add_argument("--bulk-calls", type=int, default=10, help="bulk calls (default 10)")
    p.add_argument("--rate", type=float, default=100.0, help="requests/s during the swap (default 100)")
    add_k(p, 100)
    add_recall(p, "both bundles are tuned to this recall@k")
    p.add_argument("--steady-s", type=float, default=15.0, help="steady load before and after (default 15 s)")
    p.add_argument(
        "--settle-s",
        type=float,
        default=5.0,
        help="seconds between the rebuild's end and the reload (default 5); they count as 'during "
        "rebuild', where the rebuild's after-effects on the machine (writeback, freed memory) show",
    )
    p.add_argument(
        "--swap-budget-s",
        type=float,
        default=480.0,
        help="load time left for rebuild + swap (default 480 s: a 1M rebuild at nice 10 took 160-340 s "
        "on 2 cores; a run whose swaps fall after the load's end fails and names the budget to use)",
    )
    p.add_argument(
        "--swaps",
        type=int,
        default=1,
        help="swaps after the rebuild (default 1); more swap to copies of the rebuilt bundle, each "
        "reported on its own (p99 vs steady, the worst request and the reload phase it fell in)",
    )
    p.add_argument("--swap-gap-s", type=float, default=8.0, help="seconds between repeated swaps (default 8)")
    p.add_argument(
        "--control",
        choices=sorted(CONTROL_SCRIPTS),
        default=None,
        help="before the swaps, under the same load, a plain process that reads and checksums the new "
        "bundle's files (read) or allocates and touches as much memory (alloc): does the machine "
        "stall the server without any swap? (reported as 'control')",
    )
    add_workdir(p)
    add_out(p)
    p.set_defaults(func=run)

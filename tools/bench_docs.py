#!/usr/bin/env python3
"""docs/benchmarks.md, generated from the committed benchmark runs (docs/bench/*.json).

    python tools/bench_docs.py            # (re)write docs/benchmarks.md
    python tools/bench_docs.py --check    # exit 1, one line per difference, when the page is stale

Every number on the page is read from a JSON file by this script; none is typed by hand. CI runs
`--check`, so a page edited by hand, or a JSON committed without regenerating the page, fails it.
The output depends only on the JSON files (sorted, fixed float formats, no clock), so it is the same
on every machine. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "docs" / "bench"
OUT = ROOT / "docs" / "benchmarks.md"
RECALL = 0.95  # the recall the tables pick the fastest setting at
NA = "-"


# ---- number formats: fixed, so that the page is byte-for-byte reproducible ----------------------------------


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ms(x: Any) -> str:
    """Milliseconds (or any positive quantity) to three significant digits or so."""
    if not finite(x):
        return NA
    a = abs(x)
    if a < 1:
        return f"{x:.3f}"
    if a < 10:
        return f"{x:.2f}"
    if a < 100:
        return f"{x:.1f}"
    return f"{x:.0f}"


def us(x_ms: Any) -> str:
    return f"{x_ms * 1e3:.1f}" if finite(x_ms) else NA


def rec(x: Any) -> str:
    return f"{x:.3f}" if finite(x) else NA


def fixed(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if finite(x) else NA


def count(x: Any) -> str:
    return f"{int(x):,}" if finite(x) else NA


def ratio(x: Any) -> str:
    if not finite(x):
        return NA
    return f"{x:.0f}x" if abs(x) >= 100 else f"{x:.1f}x" if abs(x) >= 10 else f"{x:.2f}x"


def share(x: Any) -> str:
    return f"{x * 100:.1f}%" if finite(x) else NA


def plural(n: Any, word: str) -> str:
    return f"{count(n)} {word}" + ("" if n == 1 else "s")


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def div(a: Any, b: Any) -> float | None:
    return a / b if finite(a) and finite(b) and b != 0 else None


def obj(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def params(p: Any) -> str:
    if not isinstance(p, dict) or not p:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in sorted(p.items()))


def get(d: Any, *path: Any) -> Any:
    """d[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if isinstance(d, dict):
            d = d.get(key)
        elif isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d):
            d = d[key]
        else:
            return None
    return d


# ---- the page ------------------------------------------------------------------------------------------------


class Page:
    """Markdown lines, each remembering the JSON file it came from (for --check's messages)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.sources: list[str] = []
        self.source = "tools/bench_docs.py"

    def link(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.out.parent)).as_posix()

    def add(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(line)
            self.sources.append(self.source)

    def para(self, *lines: str) -> None:
        self.add(*lines, "")

    def table(self, header: list[str], rows: Iterable[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        self.add("")

    def text(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


# ---- the run record -----------------------------------------------------------------------------------------


def load_avg(x: Any) -> str:
    if isinstance(x, list) and x and all(finite(v) for v in x):
        return " / ".join(f"{v:.2f}" for v in x)
    return "not recorded"


def ceilings_of(d: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The machine's ceilings recorded with a run, and where in the JSON they are."""
    run_ceilings = get(d, "run", "ceilings")
    if isinstance(run_ceilings, dict):
        return run_ceilings, "run record"
    if isinstance(d.get("machine_ceilings"), dict):
        return d["machine_ceilings"], "measured by the benchmark in the run"
    if finite(d.get("machine_sgemm_gflops")):
        threads = d.get("threads")
        c: dict[str, Any] = {"memory_bandwidth_gbs": d.get("machine_memory_bandwidth_gbs")}
        c["sgemm_gflops_all_cores" if threads in (None, get(d, "machine", "cpus")) else "sgemm_gflops_threads"] = d[
            "machine_sgemm_gflops"
        ]
        return c, "measured by the benchmark in the run"
    return None, ""


def commit_of(d: dict[str, Any]) -> str:
    run = d.get("run")
    if not isinstance(run, dict) or not run.get("commit"):
        return "not recorded"
    dirty = run.get("dirty")
    return f"{str(run['commit'])[:12]}" + (" (+ uncommitted changes)" if dirty else "")


def run_record(page: Page, d: dict[str, Any]) -> None:
    run = d.get("run") if isinstance(d.get("run"), dict) else {}
    cpu = get(d, "machine", "cpu") or "cpu not recorded"
    cpus = get(d, "machine", "cpus")
    page.add(f"- run: {d.get('created_at', 'date not recorded')} on {cpu}, {count(cpus)} cores; commit: {commit_of(d)}")
    before = load_avg(get(run, "load_average_before"))
    after = load_avg(get(run, "load_average_after"))
    if not run and finite(d.get("load_average_at_end")):
        after = f"{d['load_average_at_end']:.2f} (1 min, at the end)"
    page.add(f"- load average (1 / 5 / 15 min): before {before}; after {after}")
    c, where = ceilings_of(d)
    if c is None:
        page.add("- ceilings: not recorded")
    else:
        sgemm = []
        if finite(c.get("sgemm_gflops_1_thread")):
            sgemm.append(f"{fixed(c['sgemm_gflops_1_thread'])} GFLOP/s on 1 thread")
        if finite(c.get("sgemm_gflops_all_cores")):
            sgemm.append(f"{fixed(c['sgemm_gflops_all_cores'])} GFLOP/s on all cores")
        if finite(c.get("sgemm_gflops_threads")):
            sgemm.append(f"{fixed(c['sgemm_gflops_threads'])} GFLOP/s on {plural(d.get('threads'), 'thread')}")
        parts = ["SGEMM " + ", ".join(sgemm)] if sgemm else []
        if finite(c.get("memory_bandwidth_gbs")):
            parts.append(f"memory copy {fixed(c['memory_bandwidth_gbs'])} GB/s")
        page.add(f"- ceilings ({where}): " + ("; ".join(parts) or "not recorded"))
    page.add("")


def runs_table(page: Page, files: list[tuple[Path, dict[str, Any]]]) -> None:
    rows = []
    for path, d in files:
        run = d.get("run") if isinstance(d.get("run"), dict) else {}
        c, _ = ceilings_of(d)
        c = c or {}
        after = load_avg(get(run, "load_average_after"))
        if not run and finite(d.get("load_average_at_end")):
            after = f"{d['load_average_at_end']:.2f} (1 min)"
        rows.append(
            [
                f"[{path.name}]({page.link(path)})",
                str(d.get("created_at", NA))[:10],
                commit_of(d),
                count(get(d, "machine", "cpus")),
                load_avg(get(run, "load_average_before")),
                after,
                fixed(c.get("sgemm_gflops_1_thread")),
                fixed(c.get("sgemm_gflops_all_cores", c.get("sgemm_gflops_threads"))),
                fixed(c.get("memory_bandwidth_gbs")),
            ]
        )
    page.table(
        [
            "run",
            "date",
            "commit",
            "cores",
            "load before",
            "load after",
            "SGEMM 1 thread, GFLOP/s",
            "SGEMM all cores, GFLOP/s",
            "memory copy, GB/s",
        ],
        rows,
    )


# ---- one renderer per benchmark family ------------------------------------------------------------------------


def best_at(points: list[dict[str, Any]], target: float = RECALL) -> tuple[dict[str, Any] | None, bool]:
    """The fastest point (p50) whose recall reaches `target`, else the point of highest recall; and which."""
    ok = [p for p in points if finite(p.get("recall")) and p["recall"] >= target and finite(p.get("p50_ms"))]
    if ok:
        return min(ok, key=lambda p: (p["p50_ms"], -p["recall"], params(p.get("params")))), True
    scored = [p for p in points if finite(p.get("recall"))]
    if not scored:
        return None, False
    return max(scored, key=lambda p: (p["recall"], -(p.get("p50_ms") or 0.0), params(p.get("params")))), False


def dataset_line(d: dict[str, Any]) -> str:
    ds = obj(d.get("dataset"))
    src = obj(ds.get("source")) or ds
    queries = src.get("queries_label") or src.get("queries")
    kind = str(src.get("kind") or ds.get("kind")).split(" (")[0]
    if kind == "given":
        kind = "vectors and queries given as files"
    text = f"{count(ds.get('items'))} items x {ds.get('dim')}-d ({kind}); {count(ds.get('queries'))} queries"
    if isinstance(queries, str) and not queries.startswith("/"):
        text += f": {queries}"
    threads = d.get("single_query_threads")
    if threads is not None:
        text += f"; one query at a time on {plural(threads, 'thread')}"
    return text + "."


def render_ann(page: Page, path: Path, d: dict[str, Any]) -> None:
    points: list[dict[str, Any]] = d.get("points") or []
    series: list[dict[str, Any]] = d.get("series") or []
    ks = d.get("ks") or sorted({p["k"] for p in points})
    page.para(dataset_line(d))
    overhead: dict[str, list[float]] = {}
    for o in d.get("overhead") or []:
        if finite(o.get("overhead")):
            overhead.setdefault(o["series"], []).append(o["overhead"])
    page.table(
        [
            "series",
            "index",
            "wraps",
            "memory / raw vectors",
            "build s",
            "median p50 overhead over the wrapped library, same settings",
        ],
        [
            [
                s["name"],
                str(s.get("description", NA)),
                str(s.get("wraps") or NA),
                fixed(s.get("memory_ratio_to_raw_vectors"), 2),
                fixed(s.get("build_s")),
                share(statistics.median(overhead[s["name"]])) if s["name"] in overhead else NA,
            ]
            for s in series
        ],
    )
    for k in ks:
        best = {s["name"]: best_at([p for p in points if p["series"] == s["name"] and p["k"] == k]) for s in series}
        rows = []
        for s in series:
            p, reached = best[s["name"]]
            if p is None:
                continue
            peers = []
            if s.get("system") == "towerann" and reached:
                for other in series:
                    q, q_reached = best[other["name"]]
                    if (
                        other.get("system") != "towerann"
                        and other.get("grid") == s.get("grid")
                        and q_reached
                        and q is not None
                        and div(p.get("p50_ms"), q.get("p50_ms")) is not None
                    ):
                        peers.append(f"{other['name']} {ratio(div(p.get('p50_ms'), q.get('p50_ms')))}")
            brute, _ = best.get("numpy brute force", (None, False))
            rows.append(
                [
                    s["name"],
                    params(p.get("params")),
                    rec(p["recall"]) + ("" if reached else " (max)"),
                    ms(p.get("p50_ms")),
                    ms(p.get("p99_ms")),
                    ratio(div(obj(brute).get("p50_ms"), p.get("p50_ms"))),
                    "; ".join(peers) or NA,
                ]
            )
        page.add(f"recall@{k}: the fastest setting with recall >= {RECALL}, else the highest recall reached (max):", "")
        page.table(
            [
                "series",
                "setting",
                f"recall@{k}",
                "p50 ms",
                "p99 ms",
                "speed-up over numpy brute force (p50)",
                "p50 / same-kind peer at recall >= " + str(RECALL),
            ],
            rows,
        )
    turns = d.get("in_turns") or []
    if turns:
        page.add(
            f"Timed in turns: each towerann series and each peer of its kind at its fastest setting reaching recall "
            f"{RECALL}, {turns[0]['rounds']} rounds each timing both over every query back to back; the ratio is the "
            "median over rounds of towerann's p50 over the peer's (the sweep above times them minutes apart):",
            "",
        )
        page.table(
            ["K", "towerann", "setting, recall", "peer", "setting, recall", "p50 ms (towerann / peer)", "paired ratio"],
            [
                [
                    str(t["k"]),
                    t["series"],
                    f"{params(t['params'][0])}, {rec(t['recall'][0])}",
                    t["peer"],
                    f"{params(t['params'][1])}, {rec(t['recall'][1])}",
                    f"{ms(t['p50_ms'][0])} / {ms(t['p50_ms'][1])}",
                    ratio(t["paired_ratio"]),
                ]
                for t in turns
            ],
        )


def render_pq(page: Page, path: Path, d: dict[str, Any]) -> None:
    points: list[dict[str, Any]] = d.get("points") or []
    page.para(
        dataset_line(d) + " warm: vectors memory-mapped from disk, in the page cache; cold: the vector file "
        "evicted from the page cache before every query; in RAM: the vectors read into memory."
    )
    page.table(
        ["index", "code bytes", "resident B/item", "on disk B/item", "build s", "build peak RSS MB"],
        [
            [
                str(c.get("description")),
                count(c.get("code_bytes")),
                fixed(c.get("resident_bytes_per_item")),
                fixed(c.get("disk_bytes_per_item")),
                fixed(c.get("build_s")),
                fixed(c.get("build_peak_rss_mb"), 0),
            ]
            for c in d.get("codes") or []
        ],
    )
    rows = []
    for c in d.get("codes") or []:
        for k in d.get("ks") or []:
            sel = [p for p in points if p.get("pq_m") == c.get("pq_m") and p.get("k") == k]
            cells: list[str] = [f"PQ{c.get('pq_m')}", str(k)]
            p50 = {}
            for mode in ("warm", "cold", "ram"):
                p, reached = best_at([p for p in sel if p.get("mode") == mode])
                if p is None:
                    cells += [NA, NA]
                    continue
                p50[mode] = p.get("p50_ms")
                cells += [
                    f"{rec(p['recall'])}{'' if reached else ' (max)'} at {params(p.get('params'))}",
                    f"{ms(p.get('p50_ms'))} / {ms(p.get('p99_ms'))}",
                ]
            w, r = p50.get("warm"), p50.get("ram")
            cells.append(ratio(div(w, r)))
            codes = [p["recall"] for p in sel if get(p, "params", "rerank") == 0 and finite(p.get("recall"))]
            cells.append(rec(max(codes)) if codes else NA)
            rows.append(cells)
    page.add(f"The fastest setting with recall@k >= {RECALL} in each mode, else the highest recall (max):", "")
    page.table(
        [
            "code",
            "k",
            "warm: recall at setting",
            "warm p50 / p99 ms",
            "cold: recall at setting",
            "cold p50 / p99 ms",
            "in RAM: recall at setting",
            "in RAM p50 / p99 ms",
            "warm p50 / in-RAM p50",
            "codes alone (no re-rank): max recall@k",
        ],
        rows,
    )


def render_filter(page: Page, path: Path, d: dict[str, Any]) -> None:
    pr = d.get("params") or {}
    ds = d.get("dataset") or {}
    kind = str(ds.get("kind")).split(" (")[0]
    page.para(
        f"{count(ds.get('items'))} items x {ds.get('dim')}-d ({kind}), {count(pr.get('categories'))} "
        f"categories; a filter keeps whole categories; {count(pr.get('timed_queries'))} timed queries on "
        f"{plural(pr.get('threads'), 'thread')}; recall against exact search under the same filter. `planner` "
        "is what a search does by default; the other columns force one path."
    )
    for kind, b in sorted((d.get("backends") or {}).items()):
        tuned_by_k = sorted((b.get("tuned") or {}).items(), key=lambda x: int(x[0]))
        tuned = "; ".join(f"k={k}: {params(v)}" for k, v in tuned_by_k)
        plan = "; ".join(f"k={r[0]} up to {share(r[1])} kept: {r[2]}" for r in b.get("plan") or [])
        page.para(f"**{kind}** ({b.get('describe')}): tuned {tuned or NA}; filter plan: {plan or NA}.")
        pts = [p for p in d.get("points") or [] if p.get("kind") == kind]
        paths = sorted({p["path"] for p in pts if p.get("path") not in ("planner", "exact")})
        for k in sorted({p["k"] for p in pts}):
            rows = []
            for s in sorted({p["share"] for p in pts if p["k"] == k}):
                at = {p["path"]: p for p in pts if p["k"] == k and p["share"] == s}
                pl = at.get("planner", {})
                row = [
                    share(s),
                    count(pl.get("kept")),
                    str(pl.get("planner_chose") or NA),
                    rec(pl.get("recall")),
                    ms(pl.get("p50_ms")),
                    ms(pl.get("p99_ms")),
                    ms(get(at, "exact", "p50_ms")),
                ]
                for name in paths:
                    q = at.get(name)
                    row.append(f"{rec(q.get('recall'))} / {ms(q.get('p50_ms'))}" if q else NA)
                rows.append(row)
            page.add(f"{kind}, k={k}:", "")
            page.table(
                ["kept", "items", "planner chose", "recall", "p50 ms", "p99 ms", "exact p50 ms"]
                + [f"{name}: recall / p50 ms" for name in paths],
                rows,
            )


def stages(s: Any) -> list[str]:
    return [ms(get(s, name, "p50_ms")) for name in ("features", "user_tower", "ann", "total")]


def render_serve(page: Page, path: Path, d: dict[str, Any]) -> None:
    idx = d.get("index") or {}
    tuning = idx.get("tuning") or {}
    search = {k: v for k, v in (idx.get("search_defaults") or {}).items() if k != "filter_plan"}
    page.para(
        f"{count(d.get('items'))} items, k={d.get('k')}, {idx.get('backend')} index ({params(search)}; "
        f"tuned recall@{tuning.get('k')} {rec(tuning.get('recall'))}), {d.get('store')} feature store, "
        f"{count(d.get('users'))} users, {plural(d.get('workers', 1), 'worker')}; open-loop arrivals over "
        "HTTP on loopback."
    )
    sweeps = [("http", "over HTTP")]
    monitor = d.get("monitor")
    if isinstance(monitor, dict) and d.get("http_monitor_off"):
        sweeps = [
            ("http", f"over HTTP, recall monitor sampling {share(monitor.get('sample'))} of requests"),
            ("http_monitor_off", "over HTTP, recall monitor off"),
        ]
    for key, label in sweeps:
        rows = []
        for r in d.get(key) or []:
            e = r.get("end_to_end") or {}
            errors = sum(v for v in (r.get("errors") or {}).values() if finite(v))
            rows.append(
                [
                    count(r.get("target_rps")),
                    fixed(r.get("achieved_rps")),
                    count(e.get("n")),
                    count(errors),
                    ms(e.get("p50_ms")),
                    ms(e.get("p99_ms")),
                    ms(e.get("p999_ms")),
                ]
                + stages(r.get("stages"))
            )
        page.add(f"{label}:", "")
        page.table(
            [
                "offered /s",
                "achieved /s",
                "requests",
                "errors",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "server p50: features",
                "user tower",
                "ann",
                "total",
            ],
            rows,
        )
    ip = d.get("in_process") or {}
    if ip:
        e = ip.get("end_to_end") or {}
        page.add("In process (`Retriever.candidates`, one thread, no HTTP):", "")
        page.table(
            ["requests", "p50 ms", "p99 ms", "features p50", "user tower p50", "ann p50", "total p50"],
            [[count(ip.get("requests")), ms(e.get("p50_ms")), ms(e.get("p99_ms"))] + stages(ip.get("stages"))],
        )
    http = [r for r in d.get("http") or [] if finite(r.get("target_rps"))]
    if http:
        top = max(http, key=lambda r: r["target_rps"])
        p99 = get(top, "end_to_end", "p99_ms")
        saturated = (
            not finite(top.get("achieved_rps"))
            or top["achieved_rps"] < 0.95 * top["target_rps"]
            or not finite(p99)
            or p99 >= 100
        )
        line = (
            f"Highest offered rate {count(top['target_rps'])}/s: achieved {fixed(top.get('achieved_rps'))}/s at "
            f"p99 {ms(p99)} ms. "
        )
        if saturated:
            line += (
                f"Saturated there; the highest offered rate with p99 under 100 ms was "
                f"{count(d.get('max_sustained_rps'))}/s."
            )
        else:
            line += (
                "The run did not reach saturation: the server's capacity is above this rate, by an unmeasured margin."
            )
        page.para(line)
    ev = d.get("event_write") or {}
    extra = [f"a click (`POST /v1/events`) p50 / p99: {ms(ev.get('p50_ms'))} / {ms(ev.get('p99_ms'))} ms"] if ev else []
    mem = d.get("server_memory_after_load") or {}

    def gb(mib: Any) -> str:
        return fixed(div(mib, 1024), 2)

    if mem:
        extra.append(
            f"server memory after load: VmRSS {gb(mem.get('VmRSS'))} GB (anonymous {gb(mem.get('RssAnon'))} "
            f"GB, file-backed {gb(mem.get('RssFile'))} GB)"
        )
    im = d.get("index_memory") or {}
    if im:
        extra.append(
            f"index resident {fixed(im.get('resident_bytes_per_item'))} B/item, on disk "
            f"{fixed(im.get('disk_bytes_per_item'))} B/item"
        )
    if extra:
        page.para(sentence("; ".join(extra)) + ".")


def window_count(timeline: dict[str, Any], start: float, end: float) -> int | None:
    sent = timeline.get("sent_unix") if isinstance(timeline, dict) else None
    if not isinstance(sent, list):
        return None
    return sum(1 for t in sent if finite(t) and start <= t < end)


def render_freshness(page: Page, path: Path, d: dict[str, Any]) -> None:
    sw = d.get("swap") or {}
    ni = d.get("new_item") or {}
    bulk = d.get("bulk") or {}
    rate = sw.get("rate")
    page.para(
        f"{count(d.get('items'))} items, {d.get('index')} index, {fixed(rate, 0)} requests/s of reads under "
        f"way throughout ({count(sw.get('sent'))} sent, {count(sw.get('failed_requests'))} failed)."
    )
    w, f = ni.get("write") or {}, ni.get("write_then_found") or {}
    page.para(
        f"One new item per call: acknowledged in p50 {ms(w.get('p50_ms'))} / p99 {ms(w.get('p99_ms'))} ms, "
        f"acknowledged and found by the next request in p50 {ms(f.get('p50_ms'))} / p99 {ms(f.get('p99_ms'))} ms "
        f"({count(w.get('n'))} items; not found by the next request: "
        f"{count(ni.get('not_found_by_next_request'))}). "
        f"Bulk: {count(bulk.get('items'))} items in batches of {count(bulk.get('batch'))}, "
        f"{count(bulk.get('items_per_s'))} items/s. Rebuild (`towerann refresh` at nice "
        f"{get(sw, 'refresh', 'nice')}): {fixed(get(sw, 'refresh', 'seconds'))} s; server RSS "
        f"{fixed(sw.get('rss_mb_before'), 0)} MB before, {fixed(sw.get('rss_mb_peak_during_swap'), 0)} MB at the "
        f"peak of the first swap, {fixed(sw.get('rss_mb_after'), 0)} MB after."
    )
    rows = []
    for key, label in (
        ("steady", "steady (before the rebuild and after the swaps)"),
        ("before", "before the swap"),
        ("during_rebuild", "during the rebuild"),
        ("during_swap", "first swap window"),
        ("after", "after the swap"),
    ):
        s = sw.get(key)
        if isinstance(s, dict):
            rows.append(
                [
                    label,
                    count(s.get("n")),
                    ms(s.get("p50_ms")),
                    ms(s.get("p99_ms")),
                    ms(s.get("p999_ms")),
                    count(s.get("failed")),
                ]
            )
    page.table(["window", "requests", "p50 ms", "p99 ms", "p99.9 ms", "failed"], rows)
    tl = d.get("timeline") or {}
    rows = []
    for i, s in enumerate(sw.get("swaps") or []):
        phases = s.get("phases_s") or {}
        wr = s.get("worst_request") or {}
        n: int | None = None
        if i == 0:
            n = get(sw, "during_swap", "n")
        elif finite(wr.get("sent_unix")) and finite(wr.get("after_reload_start_s")):
            t0 = wr["sent_unix"] - wr["after_reload_start_s"]  # the reload began here
            n = window_count(tl, t0 - 0.5, t0 + sum(v for v in phases.values() if finite(v)) + 1.0)
        rows.append(
            [
                f"swap {i + 1}",
                ("" if i == 0 else "~") + count(n),
                ms(s.get("p99_ms")),
                ratio(s.get("p99_over_steady")),
                f"{ms(wr.get('latency_ms'))} ({wr.get('phase', NA)})",
                fixed(phases.get("load"), 2),
                fixed(phases.get("validate"), 2),
                count(s.get("failed")),
            ]
        )
    c = sw.get("control")
    if isinstance(c, dict):
        n = (
            window_count(tl, c["start"] - 0.5, c["end"] + 1.0)
            if finite(c.get("start")) and finite(c.get("end"))
            else None
        )
        rows.append(
            [
                f"control ({c.get('kind')}, no swap)",
                count(n),
                ms(c.get("p99_ms")),
                ratio(c.get("p99_over_steady")),
                ms(get(c, "worst_request", "latency_ms")),
                NA,
                NA,
                count(c.get("failed")),
            ]
        )
    if rows:
        page.para(
            "Each swap's window runs from 0.5 s before the reload call to 1 s after it answered; its p99 is "
            "taken over the requests in that window, so a window of n requests has its p99 near its "
            "n/100-th slowest request. The control runs a plain process that reads (or allocates) as much as "
            "a bundle, with no swap, under the same load. Request counts marked ~ are counted from the "
            "timeline over the reload's phases (the JSON does not record those windows' bounds)."
        )
        page.table(
            [
                "window",
                "requests",
                "p99 ms",
                "p99 / steady p99",
                "slowest request ms (reload phase)",
                "load s",
                "validate s",
                "failed",
            ],
            rows,
        )


def render_soak(page: Page, path: Path, d: dict[str, Any]) -> None:
    mix = d.get("mix") or {}
    ev = d.get("events") or {}
    shares = ", ".join(f"{share(v)} {k}s" for k, v in sorted(mix.items()))
    page.para(
        f"{count(d.get('items'))} items, {d.get('index')} index, k={d.get('k')}, "
        f"{fixed(d.get('duration_s'), 0)} s at {fixed(d.get('rate'), 0)} requests/s ({shares}); a refresh at "
        f"{fixed(ev.get('refresh_start'), 0)} s with its swap at {fixed(ev.get('swap_start'), 1)}-"
        f"{fixed(ev.get('swap_end'), 1)} s; Redis killed (SIGKILL) at {fixed(ev.get('redis_kill'), 0)} s and "
        f"ready again at {fixed(ev.get('redis_ready'), 1)} s."
    )
    lat = d.get("latency") or {}
    rows = []
    for key, label in (
        ("steady", "steady"),
        ("during_refresh", "during the rebuild"),
        ("during_swap", "around the swap"),
        ("during_redis_outage", "Redis down"),
    ):
        s = lat.get(key)
        if isinstance(s, dict):
            rows.append(
                [
                    label,
                    count(s.get("n")),
                    ms(s.get("p50_ms")),
                    ms(s.get("p99_ms")),
                    ms(s.get("p999_ms")),
                    count(s.get("failed")),
                ]
            )
    for kind, s in sorted((lat.get("per_kind") or {}).items()):
        rows.append(
            [f"all {kind}s", count(s.get("n")), ms(s.get("p50_ms")), ms(s.get("p99_ms")), ms(s.get("p999_ms")), NA]
        )
    page.table(["window", "requests", "p50 ms", "p99 ms", "p99.9 ms", "failed"], rows)
    rb = d.get("readback") or {}
    rss = d.get("rss") or {}
    dg = d.get("degraded_reads") or {}
    page.para(
        f"Sent {count(d.get('sent'))}; server errors outside the Redis outage: "
        f"{count(d.get('server_errors_outside_outage'))}; degraded reads during / outside the outage: "
        f"{count(dg.get('during_outage'))} / {count(dg.get('outside_outage'))}. Read back at the end: "
        f"{count(rb.get('items_acknowledged'))} acknowledged item writes ({count(rb.get('items_lost'))} lost), "
        f"{count(rb.get('clicks_acknowledged'))} acknowledged clicks ({count(rb.get('clicks_lost'))} lost). "
        f"Server RSS growth: {share(get(rss, 'before_swap', 'growth'))} before the swap, "
        f"{share(get(rss, 'after_swap', 'growth'))} after it, {share(get(rss, 'after_warmup', 'growth'))} over "
        f"the whole run after warm-up (peak {fixed(rss.get('peak_mb'), 0)} MB)."
    )


def render_drift(page: Page, path: Path, d: dict[str, Any]) -> None:
    cfg = d.get("config") or {}
    mon, rt = obj(cfg.get("monitor")), obj(cfg.get("retune"))
    rule = obj(d.get("phase_rule"))
    build = obj(d.get("build"))
    tuned = obj(build.get("tuning"))
    start = params(build.get("start_settings")) if build.get("start_settings") else "the tuned setting"
    page.para(
        f"{count(d.get('items'))} items x {d.get('dim')}-d (synthetic clusters) served as a vectors-only "
        f"{d.get('kind')} bundle ({build.get('index')}) tuned to recall@{d.get('k')} {rec(d.get('recall_target'))} "
        f"(tuned {params(tuned.get('params'))}; started at {start}); "
        f"`query_vector` requests at {fixed(d.get('rate'), 0)}/s, open loop ({count(d.get('sent'))} sent, "
        f"{count(d.get('failed'))} failed). The client checks {share(d.get('check_share'))} of the answers against "
        f"exact search; its recall is the mean over the last {fixed(d.get('window_s'), 0)} s of the phase. A phase "
        f"lasts {fixed(rule.get('min_phase_s'), 0)}-{fixed(rule.get('phase_s'), 0)} s and ends once that recall has "
        f"held the target for {fixed(rule.get('hold_s'), 0)} s. Recall falls when a window's one-sided 95% upper "
        "bound is under the target and is back when a window's mean reaches it; latency is end to end at the "
        "client, from the scheduled send (queueing included), and the server's own time in the index."
    )
    page.para(
        f"Server: [monitor] sample {mon.get('sample')}, max_busy {mon.get('max_busy')}, reservoir "
        f"{mon.get('reservoir')} (max age {fixed(mon.get('reservoir_max_age_s'), 0)} s); [retune] samples "
        f"{rt.get('samples')}, confidence {rt.get('confidence')}, max_p99_ms {rt.get('max_p99_ms')}, min_queries "
        f"{rt.get('min_queries')}, margin {rt.get('margin')}, cooldown {fixed(rt.get('cooldown_s'), 0)} s."
    )
    rows = []
    for ph in d.get("phases") or []:
        back = ph.get("time_to_recover_s")
        by = ph.get("applied_before_recovery")
        how = NA if by is None else ("by itself" if not by else "re-tune at " + ", ".join(f"{t:.0f} s" for t in by))
        events: dict[str, int] = {}
        for a in ph.get("actions") or []:
            key = str(a.get("outcome") or a.get("event"))
            events[key] = events.get(key, 0) + 1
        ing = ph.get("ingest")
        what = str(ph.get("what"))
        if isinstance(ing, dict):
            what += f" ({count(ing.get('rows'))} items at {count(ing.get('rows_per_s'))}/s)"
        rows.append(
            [
                f"{ph.get('name')}: {what}",
                fixed(ph.get("seconds"), 0),
                rec(ph.get("client_recall_min")),
                rec(ph.get("client_recall_end")),
                "never" if back is None and ph.get("dropped") else fixed(back, 0),
                how,
                rec(ph.get("server_recall_end")),
                ms(get(ph, "latency", "p99_ms")),
                ms(ph.get("p99_max_per_second_ms")),
                count(ph.get("seconds_over_budget")),
                ms(ph.get("p99_window_max_ms")),
                count(ph.get("windows_over_budget")),
                ms(ph.get("ann_p99_max_per_second_ms")),
                count(ph.get("ann_seconds_over_budget")),
                count(ph.get("failed")),
                ", ".join(f"{k} {v}" for k, v in sorted(events.items())) or "none",
            ]
        )
    page.table(
        [
            "phase",
            "s",
            "client recall min",
            "at the end",
            "back at target after, s",
            "how",
            "server recall at the end",
            "p99 ms",
            "worst p99 of a second, ms",
            f"seconds over {ms(rt.get('max_p99_ms'))} ms",
            f"worst p99 of a {fixed(d.get('window_s'), 0)} s window, ms",
            "windows over the budget",
            "server ann stage: worst p99 of a second, ms",
            f"seconds over {ms(rt.get('max_p99_ms'))} ms",
            "failed",
            "loop actions",
        ],
        rows,
    )
    acts = [a for a in d.get("actions") or [] if a.get("event") != "retune_started"]
    if acts:
        page.table(
            ["t, s", "action", "setting", "held-out recall", "p99 ms", "took s", "reason"],
            [
                [
                    fixed(a.get("t"), 0),
                    str(a.get("outcome") or a.get("event")),
                    params(get(a, "details", "params")),
                    rec(get(a, "details", "heldout_recall")),
                    ms(get(a, "details", "p99_ms")),
                    fixed(get(a, "details", "seconds")),
                    str(a.get("reason", NA)),
                ]
                for a in acts
            ],
        )
    tg = obj(d.get("targets"))
    page.para(
        "Targets: "
        + "; ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(tg.items()))
        + "."
    )


def render_shards(page: Page, path: Path, d: dict[str, Any]) -> None:
    pr = d.get("params") or {}
    un = d.get("unsharded") or {}
    page.para(
        f"{count(get(d, 'dataset', 'items'))} items x {get(d, 'dataset', 'dim')}-d "
        f"({str(get(d, 'dataset', 'kind')).split(' (')[0]}); {pr.get('backend')} "
        f"{params(pr.get('build_params'))}, k={pr.get('k')}, "
        f"searched at {params(pr.get('search_params'))}; a local Ray cluster of {pr.get('nodes')} nodes; "
        f"{count(pr.get('timed_queries'))} timed queries, one at a time (batch: {pr.get('batch')} a call). "
        f"Unsharded: recall@{pr.get('k')} {rec(un.get('recall'))}, p50 / p99 {ms(get(un, 'local', 'p50_ms'))} / "
        f"{ms(get(un, 'local', 'p99_ms'))} ms in process."
    )
    rows = []
    for p in d.get("points") or []:
        rows.append(
            [
                str(p.get("shards")),
                rec(p.get("recall")),
                f"{fixed((p.get('recall_points_vs_unsharded')), 2)}",
                ms(get(p, "local_in_process", "p50_ms")),
                ms(get(p, "search_plain", "p50_ms")),
                ms(get(p, "search_plain", "p99_ms")),
                ms(get(p, "search_compiled", "p50_ms")),
                ms(get(p, "batch_plain_per_query", "p50_ms")),
                f"{ms(get(p, 'noop_plain', 'p50_ms'))} / {ms(get(p, 'noop_compiled', 'p50_ms'))}",
                ms(get(p, "merge", "p50_ms")),
                ms(p.get("overhead_p50_ms")),
            ]
        )
    page.table(
        [
            "shards",
            "recall",
            "vs unsharded, points",
            "in-process p50 ms",
            "Ray p50 ms",
            "Ray p99 ms",
            "compiled graph p50 ms",
            "batched, per query p50 ms",
            "no-op fan-out p50 ms (calls / compiled)",
            "merge p50 ms",
            "Ray p50 - unsharded p50, ms",
        ],
        rows,
    )
    settings = sorted(get(un, "recall_by_setting") or {})
    if settings:
        rows = [
            [s, rec(get(un, "recall_by_setting", s))]
            + [rec(get(p, "recall_by_setting", s)) for p in d.get("points") or []]
            for s in settings
        ]
        page.table(["setting", "unsharded"] + [f"S={p.get('shards')}" for p in d.get("points") or []], rows)


def render_embed(page: Page, path: Path, d: dict[str, Any]) -> None:
    e = d.get("end_to_end") or {}
    t = d.get("pure_tower") or {}
    st = e.get("stages_in_run_s") or {}
    page.para(
        f"{count(d.get('items'))} items to {d.get('dim')}-d vectors, batches of {count(d.get('batch_size'))}, "
        f"{plural(d.get('threads'), 'thread')}."
    )
    page.table(
        ["", "seconds", "items/s", "GFLOP/s", "share of SGEMM"],
        [
            [
                "end to end (Parquet in, vectors out)",
                fixed(e.get("seconds")),
                count(e.get("items_per_s")),
                fixed(e.get("gflops")),
                share(d.get("ratio_end_to_end_to_sgemm")),
            ],
            [
                "the item tower alone",
                NA,
                count(t.get("items_per_s")),
                fixed(t.get("gflops")),
                share(d.get("ratio_tower_to_sgemm")),
            ],
        ],
    )
    page.para(
        f"Within the end-to-end run: tower {fixed(st.get('tower_s'))} s, writing {fixed(st.get('write_s'))} s, "
        f"waiting for the reader {fixed(st.get('wait_reader_s'))} s; output "
        f"{fixed(div(e.get('output_bytes'), 1e9), 2)} GB."
    )


def render_tower(page: Page, path: Path, d: dict[str, Any]) -> None:
    page.para(
        f"One user-tower call on {plural(d.get('threads'), 'thread')}, {count(d.get('requests'))} calls, "
        f"{d.get('dim')}-d, history {d.get('history_len')}; microseconds."
    )
    rows = []
    for name, r in sorted((d.get("runtimes") or {}).items()):
        a, b = r.get("tower_call_only") or {}, r.get("with_feature_assembly") or {}
        rows.append([name, us(a.get("p50_ms")), us(a.get("p99_ms")), us(b.get("p50_ms")), us(b.get("p99_ms"))])
    page.table(["runtime", "tower call p50", "p99", "with feature assembly p50", "p99"], rows)


def render_model(page: Page, path: Path, d: dict[str, Any]) -> None:
    page.para(
        f"Metric: {d.get('metric')}; torch on {plural(d.get('torch_threads'), 'thread')}; search budget "
        f"{fixed(d.get('search_budget_s'), 0)} s ({fixed(d.get('movielens_search_budget_s'), 0)} s on "
        f"ml-100k), at most {d.get('search_max_trials')} trials."
    )
    rows = []
    for r in d.get("rows") or []:
        rows.append(
            [
                str(r.get("regime")),
                count(r.get("interactions")),
                rec(r.get("two_tower_default")),
                rec(r.get("two_tower_searched")),
                rec(r.get("als_default")),
                rec(r.get("als_tuned")),
                rec(r.get("popularity")),
                params(r.get("chosen")),
                params(r.get("als_chosen")),
            ]
        )
    page.table(
        [
            "regime",
            "interactions",
            "two-tower default",
            "two-tower --search",
            "ALS default",
            "ALS tuned",
            "popularity",
            "two-tower chosen",
            "ALS chosen",
        ],
        rows,
    )


def render_session(page: Page, path: Path, d: dict[str, Any]) -> None:
    ni = d.get("next_item") or {}
    sh = d.get("interest_shift") or {}
    curve = sh.get("share_by_clicks") or []
    after = "; ".join(f"{n}: {share(curve[n])}" for n in (1, 2, 5, 10) if n < len(curve) and finite(curve[n]))
    page.table(
        [
            "dataset",
            "users",
            "recall@10 with session",
            "without",
            "recall@100 with session",
            "without",
            "clicks until 20% / 50% of the top 100",
            "share of the clicked category in the top 100 after N clicks",
        ],
        [
            [
                str(d.get("dataset")),
                count(ni.get("users")),
                rec(get(ni, "with_session", "recall@10")),
                rec(get(ni, "without_session", "recall@10")),
                rec(get(ni, "with_session", "recall@100")),
                rec(get(ni, "without_session", "recall@100")),
                f"{sh.get('clicks_to_20pct') if sh.get('clicks_to_20pct') is not None else 'not reached'} / "
                f"{sh.get('clicks_to_50pct') if sh.get('clicks_to_50pct') is not None else 'not reached'}",
                after or NA,
            ]
        ],
    )


def render_other(page: Page, path: Path, d: dict[str, Any]) -> None:
    scalars = [(k, v) for k, v in sorted(d.items()) if finite(v) and k not in ("created_at",)]
    if scalars:
        page.table(["field", "value"], [[k, f"{v:.6g}" if isinstance(v, float) else str(v)] for k, v in scalars])


# (file-name prefix, section title, what measures it, renderer); the first matching prefix wins.
Renderer = Callable[[Page, Path, dict[str, Any]], None]
FAMILIES: list[tuple[str, str, str, Renderer]] = [
    ("tower", "User tower", "`towerann bench tower`", render_tower),
    ("embed", "Batch embedding", "`towerann bench embed`", render_embed),
    ("model", "Model quality per data regime", "`towerann bench model`", render_model),
    ("session", "What real-time clicks are worth", "`towerann eval --session`", render_session),
    ("ann-far", "ANN search: far-off queries", "`towerann bench ann --set far`", render_ann),
    ("ann", "ANN search: user-tower queries", "`towerann bench ann`", render_ann),
    ("pq", "The compressed index", "`towerann bench pq`", render_pq),
    ("filter", "Filtered search", "`towerann bench filter`", render_filter),
    ("serve", "Serving over HTTP", "`towerann bench serve`", render_serve),
    ("freshness", "Freshness: new items and hot swaps", "`towerann bench freshness`", render_freshness),
    ("soak", "Soak", "`towerann bench soak`", render_soak),
    ("drift", "Drift: the live re-tune under a shifting query distribution", "`towerann bench drift`", render_drift),
    ("shards", "Sharded index on Ray", "`towerann bench shards`", render_shards),
    ("", "Other runs", "a benchmark this page has no table for yet", render_other),
]


def family(path: Path) -> int:
    return next(i for i, (prefix, *_rest) in enumerate(FAMILIES) if path.name.startswith(prefix))


def generate(bench_dir: Path, out: Path) -> Page:
    files = [(p, json.loads(p.read_text())) for p in sorted(bench_dir.glob("*.json"))]
    page = Page(out)
    page.para(
        "# Benchmarks",
        "",
        "Generated by `tools/bench_docs.py` from the committed runs in "
        f"[{page.link(bench_dir)}/]({page.link(bench_dir)}/): do not edit by hand. "
        "`python tools/bench_docs.py` regenerates it and `python tools/bench_docs.py --check` (run in CI) "
        "fails when it differs from what the JSON files say.",
    )
    page.para(
        "Each run is one `towerann bench ...` (or `towerann eval --session`) invocation. Times are medians "
        "(p50) and tail percentiles of single requests unless a table says otherwise. Each run record gives "
        "the commit it ran on, the load average (1, 5 and 15 minutes) before and after it, and the machine's "
        "ceilings: its SGEMM rate on 1 thread and on all cores and its memory-copy bandwidth. Runs written "
        'before `bench` recorded these say "not recorded". Numbers from different runs were measured on '
        "machines with different ceilings: compare ratios within one run, not absolute times across runs."
    )
    page.para("## Runs")
    runs_table(page, files)
    by_family: dict[int, list[tuple[Path, dict[str, Any]]]] = {}
    for path, d in files:
        by_family.setdefault(family(path), []).append((path, d))
    for i, (_prefix, title, command, render) in enumerate(FAMILIES):
        if i not in by_family:
            continue
        page.source = "tools/bench_docs.py"
        page.para(f"## {title}")
        page.para(f"Measured by {command}.")
        for path, d in by_family[i]:
            page.source = Path(os.path.relpath(path)).as_posix()
            page.para(f"### [{path.name}]({page.link(path)})")
            run_record(page, d)
            render(page, path, d)
    return page


def clip(line: str, width: int = 100) -> str:
    return repr(line if len(line) <= width else line[: width - 3] + "...")


def check(page: Page) -> list[str]:
    """One message per line that differs between the page on disk and the generated one."""
    name = os.path.relpath(page.out)
    if not page.out.exists():
        return [f"{name}: missing; run `python tools/bench_docs.py`"]
    have = page.out.read_text().splitlines()
    want = page.text().splitlines()
    out = []
    matcher = difflib.SequenceMatcher(a=have, b=want, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            continue
        for j in range(max(a1 - a0, b1 - b0)):
            a, b = a0 + j, b0 + j
            src = page.sources[min(b, b1 - 1)] if b1 > b0 else page.sources[min(b0, len(page.sources) - 1)]
            if a < a1 and b < b1:
                out.append(f"{name}:{a + 1}: {clip(have[a])} differs from the generated {clip(want[b])} (from {src})")
            elif a < a1:
                out.append(f"{name}:{a + 1}: {clip(have[a])} is not in the generated page")
            else:
                out.append(f"{name}:{a0 + 1}: the generated line {clip(want[b])} is missing (from {src})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="where the JSON runs are (default docs/bench)")
    ap.add_argument("--out", type=Path, default=OUT, help="the page to write or check (default docs/benchmarks.md)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page differs")
    args = ap.parse_args(argv)
    if not args.bench_dir.is_dir():
        print(f"bench_docs: {args.bench_dir} is not a directory", file=sys.stderr)
        return 2
    page = generate(args.bench_dir.resolve(), args.out.resolve())
    if args.check:
        problems = check(page)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(
                f"bench_docs: {len(problems)} difference(s); run `python tools/bench_docs.py` and commit the page",
                file=sys.stderr,
            )
            return 1
        return 0
    args.out.write_text(page.text())
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

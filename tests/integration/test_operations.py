"""The dashboard and docs/operations.md against what real servers export: every metric family a server's
/metrics has is on a panel of the dashboard or listed as left off, and in the operations table (with what
to do); every metric the dashboard and the alerts query is one a server exports. One process (a server
in a thread), and `towerann serve --workers 2` (process metrics per worker; its JSON log, line by line)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from test_faults import PASSWORD, PrivateRedis

from towerann.server.server import start_subprocess

DOCS = Path(__file__).resolve().parents[2] / "docs"
METRIC = re.compile(r"\b(?:towerann|process)_[a-z_]+")
PROCESS = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds")


def exported(url: str) -> str:
    """The server's /metrics text, after one request of each kind has been served."""
    httpx.post(f"{url}/v1/candidates", json={"user_id": "1", "k": 5}).raise_for_status()
    return httpx.get(f"{url}/metrics").text


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def families(text: str) -> set[str]:
    """The metric families, as the # TYPE lines name them (a counter's with _total)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}


def series(text: str) -> set[str]:
    """Every name a query may use: the samples there are, and each family's, with a histogram's
    _bucket, _sum and _count even before its first observation."""
    types = [line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE")]
    suffixes = {"histogram": ("", "_bucket", "_sum", "_count")}
    return sample_names(text) | {name + s for name, kind in types for s in suffixes.get(kind, ("",))}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    found = re.findall(r"`([^`]*(?:towerann|process)_[^`]*)`", (DOCS / "operations.md").read_text())
    return [m for m in found if "(" in m]


def queried(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in METRIC.findall(e)}


def table(heading: str) -> set[str]:
    """The metric names in the first column of the table under `## heading` in operations.md."""
    text = (DOCS / "operations.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {row.split("`")[1] for row in rows}


def problems(text: str) -> list[str]:
    """What the dashboard and the docs leave out of this /metrics text."""
    on_panels, left_off, documented = queried(dashboard_exprs()), table("Not on the dashboard"), table("Metrics")
    out = []
    for family in sorted(families(text)):
        if any(family == name or (name.startswith("*") and family.endswith(name[1:])) for name in left_off):
            continue
        if not on_panels & {family, f"{family}_bucket", f"{family}_sum", f"{family}_count"}:
            out.append(f"{family}: on no dashboard panel, and not in 'Not on the dashboard'")
        if family not in documented:
            out.append(f"{family}: not in the Metrics table of docs/operations.md")
    return out


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(server) -> None:
    have = series(exported(server.url))
    exprs = dashboard_exprs()
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert len(exprs) >= 7 and all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dash["panels"])
    alerts = alert_exprs()
    assert len(alerts) >= 6, alerts
    names = queried(exprs + alerts)
    missing = sorted(names - have)  # a histogram is queried by its _bucket series, a counter by its _total
    assert not missing, f"queried but not exported: {missing}; exported: {sorted(have)}"
    assert {"towerann_stage_seconds_bucket", "towerann_http_requests_total", *PROCESS} <= names


def test_every_exported_family_is_on_the_dashboard_or_left_off_and_documented(server) -> None:
    text = exported(server.url)
    assert set(PROCESS) <= sample_names(text)  # the process metrics of this process (Linux /proc)
    assert {"towerann_recall", "towerann_partial_answers_total", "towerann_recall_samples_dropped_total"} <= families(
        text
    )
    assert not problems(text), problems(text)


def test_the_left_off_and_documented_lists_name_real_metrics(server) -> None:
    """A stale entry (a metric renamed or gone) in either table fails here, so the lists stay honest."""
    have = families(exported(server.url))
    for name in table("Not on the dashboard") | table("Metrics"):
        if name.startswith("*"):
            assert any(f.endswith(name[1:]) for f in have), name
        else:
            assert name in have, f"{name} is in docs/operations.md, but no server exports it"


# ---- several workers: per-worker process metrics, JSON log lines -------------------------------


def eventually(probe: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_workers_export_process_metrics_per_worker_and_log_json_lines(tmp_path: Path, bundle_paths) -> None:
    redis = PrivateRedis(tmp_path / "redis")  # with a password: no line may show it
    token = "ops-token-41d9"
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    toml = tmp_path / "serve.toml"
    toml.write_text(f'[serve]\nlog_format = "json"\n[paths]\nindex = "{root}"\n[freshness]\npoll_s = 0.5\n')
    log = tmp_path / "server.log"
    handle = start_subprocess(
        root, redis.url, config=toml, workers=2, env={"TOWERANN_API_TOKEN": token}, log_file=log, access_log=True
    )
    try:
        n = 12
        with httpx.Client(base_url=handle.url) as http:
            for i in range(n):  # a connection each: the kernel hands them to either worker
                r = httpx.post(f"{handle.url}/v1/candidates", json={"user_id": str(i), "k": 7})
                assert r.status_code == 200, r.text
            r = httpx.delete(f"{handle.url}/v1/items/1", headers={"Authorization": "Bearer wrong-" + token})
            assert r.status_code == 401
            text = http.get("/metrics").text
    finally:
        handle.stop()
        redis.close()

    rss = [line for line in text.splitlines() if line.startswith("process_resident_memory_bytes{")]
    workers = {name for line in rss for name in re.findall(r'worker="([^"]+)"', line)}
    assert workers == {"parent", "0", "1"}, rss
    assert all(float(line.rsplit(" ", 1)[1]) > 0 for line in rss)
    for name in PROCESS:
        assert sum(line.startswith(name + "{") for line in text.splitlines()) == 3, name
    assert not problems(text), problems(text)

    raw = log.read_text()
    assert PASSWORD not in raw and token not in raw
    lines = [json.loads(line) for line in raw.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(o) for o in lines)
    access = [o for o in lines if o["logger"] == "towerann.access"]
    candidates = [o for o in access if o["route"] == "/v1/candidates"]
    assert len(candidates) == n and all(o["status"] == 200 and o["k"] == 7 for o in candidates)
    assert {o["worker"] for o in candidates} <= {"0", "1"}
    assert [(o["method"], o["route"], o["status"]) for o in access if o["status"] == 401] == [
        ("DELETE", "/v1/items/{item_id}", 401)
    ]
    assert any(o["logger"] == "towerann.server.workers" and "serving on" in o["msg"] for o in lines)

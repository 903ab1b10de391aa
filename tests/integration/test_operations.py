"""The dashboard and the alerts of docs/operations.md query only metrics a real server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

DOCS = Path(__file__).resolve().parents[2] / "docs"


def exported(url: str) -> set[str]:
    """Every sample name the server's /metrics has, after one request of each kind has been served."""
    httpx.post(f"{url}/v1/candidates", json={"user_id": "1", "k": 5}).raise_for_status()
    text = httpx.get(f"{url}/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")} | {
        line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")
    }


def queried(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in re.findall(r"\btowerann_[a-z_]+", e)}


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(server) -> None:
    have = exported(server.url)
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 7 and all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dash["panels"])
    alerts = [m for m in re.findall(r"`([^`]*towerann_[^`]*)`", (DOCS / "operations.md").read_text()) if "(" in m]
    assert len(alerts) >= 6, alerts
    names = queried(exprs + alerts)
    missing = sorted(names - have)  # a histogram is queried by its _bucket series, a counter by its _total
    assert not missing, f"queried but not exported: {missing}; exported: {sorted(have)}"
    assert {"towerann_stage_seconds_bucket", "towerann_http_requests_total"} <= names

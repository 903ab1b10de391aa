"""`towerann bench filter` on a tiny catalog: every (backend, K, share, path) is measured and written."""

from __future__ import annotations

import json
from pathlib import Path

from towerann.bench.filter import run_filter_bench


def test_bench_filter_measures_the_planner_and_every_path_and_writes_json_and_png(tmp_path: Path) -> None:
    r = run_filter_bench(
        4000,
        dim=16,
        ks=(20,),
        backends=("exact", "hnsw"),
        shares=(0.01, 0.1, 1.0),
        n_queries=40,
        n_time=10,
        out=tmp_path,
    )
    assert sorted(Path(f).name for f in r["files"]) == ["filter-4000.json", "filter-4000.png"]
    written = json.loads((tmp_path / "filter-4000.json").read_text())
    assert written["points"] == r["points"] and written["backends"]["hnsw"]["plan"]
    # searched as `index build --k 20 --recall R --queries` leaves the index: tuned ef, the calibrated plan
    hnsw = r["backends"]["hnsw"]
    assert hnsw["tuned"]["20"]["exact_below"] == 0 and hnsw["calibration"]["20"] and hnsw["calibration_s"] > 0
    assert all(row[0] == 20 for row in hnsw["plan"])
    got = {(p["kind"], p["share"], p["path"]) for p in r["points"]}
    assert got == {
        ("exact", 0.01, "planner"),
        ("exact", 0.01, "exact"),
        ("exact", 0.1, "planner"),
        ("exact", 0.1, "exact"),
        ("exact", 1.0, "planner"),
        *{("hnsw", s, p) for s in (0.01, 0.1) for p in ("planner", "exact", "filtered", "post")},
        ("hnsw", 1.0, "planner"),
    }
    for p in r["points"]:
        assert 0 < p["kept"] <= 4000 and p["p99_ms"] >= p["p50_ms"] > 0
        if p["path"] == "exact" or p["kind"] == "exact":
            assert p["recall"] == 1.0, p  # brute force is the ground truth
    # the planner did what its stored plan says
    assert all(
        p["planner_chose"] in ("exact", "filtered", "post")
        for p in r["points"]
        if p["path"] == "planner" and p["share"] < 1.0
    )
    assert {(t["kind"], t["share"]) for t in r["targets"]} == {
        (k, s) for k in ("exact", "hnsw") for s in (0.01, 0.1, 1.0)
    }
    # the p50 bound is checked at the mid-range shares only, against the same index's unfiltered p50
    unfiltered = {p["kind"]: p["p50_ms"] for p in r["points"] if p["share"] == 1.0}
    for t in r["targets"]:
        assert ("p50_ok" in t) == (t["share"] == 0.1), t
        if "p50_ok" in t:
            assert t["p50_bound_ms"] == round(2 * unfiltered[t["kind"]], 4)

"""`towerann bench filter --partition-by category` on a tiny catalog: the partition path is measured
beside the others, the planner may choose it, and the partitions' memory is recorded."""

from __future__ import annotations

import json
from pathlib import Path

from towerann.bench.filter import run_filter_bench


def test_bench_filter_measures_the_partition_path_and_records_its_memory(tmp_path: Path) -> None:
    r = run_filter_bench(
        6000,
        dim=16,
        ks=(20,),
        backends=("hnsw",),
        shares=(0.05, 0.3, 1.0),
        n_queries=40,
        n_time=5,
        out=tmp_path,
        partition_by="category",
        partition_min=300,
        filter_order="largest",
    )
    assert sorted(Path(f).name for f in r["files"]) == [
        "filter-6000-partitions-category-largest.json",
        "filter-6000-partitions-category-largest.png",
    ]
    written = json.loads((tmp_path / "filter-6000-partitions-category-largest.json").read_text())
    assert written["params"]["partition_by"] == "category" and written["params"]["partition_min"] == 300
    biggest = max(r["points"], key=lambda p: p["kept"] if p["share"] < 1 else 0)
    assert biggest["share"] == 0.3 and biggest["kept"] >= max(
        r["backends"]["hnsw"]["partitions"]["sizes"]
    )  # biggest first
    info = r["backends"]["hnsw"]
    part = info["partitions"]
    assert part["by"] == "category" and min(part["sizes"]) >= 300 and part["memory"]["bytes_per_partitioned_item"] > 64
    assert "partitions=category" in info["describe"]
    assert {"partition_ef_scale", "partition_walk_cost"} <= set(info["tuned"]["20"])
    got = {(p["share"], p["path"]) for p in r["points"]}
    assert got == {
        *((s, p) for s in (0.05, 0.3) for p in ("planner", "exact", "filtered", "post", "partition")),
        (1.0, "planner"),
    }
    for p in r["points"]:
        if p["path"] == "partition":
            assert p["recall"] >= 0.9, p
    assert all(
        p["planner_chose"] in ("exact", "filtered", "post", "partition")
        for p in r["points"]
        if p["path"] == "planner" and p["share"] < 1.0
    )

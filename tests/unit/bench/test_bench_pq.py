"""`bench pq` on a small far-off catalog: every code size and mode measured, honest memory numbers."""

from __future__ import annotations

import json

import numpy as np

from towerann.bench.ann import far_dataset
from towerann.bench.compressed import run_pq_bench


def test_bench_pq_reports_memory_recall_and_warm_cold_latency(tmp_path):
    data = far_dataset(4000, dim=32, n_queries=40, seed=1)
    r = run_pq_bench(
        data.vectors,
        data.queries,
        ks=(10,),
        pq_ms=(4, 8),
        n_queries=20,
        n_cold=4,
        quick=True,
        out=tmp_path,
        work=tmp_path,
        source=data.source,
    )
    saved = json.loads((tmp_path / "pq.json").read_text())
    assert (tmp_path / "pq.png").stat().st_size > 0 and saved["codes"] == r["codes"]
    by_pq = {c["pq_m"]: c for c in r["codes"]}
    assert set(by_pq) == {4, 8}
    for c in r["codes"]:
        assert c["code_bytes"] == c["pq_m"] and c["disk_bytes_per_item"] == 32 * 4
        # On disk the process keeps codes + ids + tables, far below the 128-byte vectors; in RAM, more than them.
        assert c["resident_bytes_per_item"] < 32 * 4 < c["resident_bytes_per_item_in_ram"]
    assert by_pq[8]["resident_bytes_per_item"] - by_pq[4]["resident_bytes_per_item"] == 4  # 4 more code bytes
    modes = {(p["pq_m"], p["mode"], p["params"]["rerank"] > 0) for p in r["points"]}
    assert (4, "cold", True) in modes and (8, "cold", True) in modes
    assert not any(p["mode"] == "cold" and p["params"]["rerank"] == 0 for p in r["points"])  # nothing read: no cold run
    for p in r["points"]:
        assert 0.0 <= p["recall"] <= 1.0 and 0 < p["p50_ms"] <= p["p99_ms"]
    # The same setting finds the same items warm, cold and in RAM (only the reads differ).
    same = {}
    for p in r["points"]:
        if p["mode"] != "cold":
            same.setdefault((p["pq_m"], repr(p["params"])), set()).add(round(p["recall"], 6))
    assert all(len(v) == 1 for v in same.values()), same
    assert set(r["targets"]) and all("met" in t for t in r["targets"].values())


def test_bench_pq_generated_builds_part_by_part_and_stores_no_vectors_file(tmp_path):
    """--set generated (the 100M path), small: the CLI's path end to end, then again on the same work
    directory, which resumes (nothing rebuilt, the cached ground truth reused)."""
    from towerann.cli import main

    argv = ["bench", "pq", "--set", "generated", "--items", "12000", "--part-size", "3000", "--dim", "32"]
    argv += ["--pq-m", "8", "--rerank-dtype", "float16", "--k", "10", "--nprobes", "8,64", "--pools", "0,8"]
    argv += ["--queries-n", "60", "--cold-queries", "5", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    assert main(argv) == 0
    r = json.loads((tmp_path / "pq-12000.json").read_text())
    assert r["dataset"]["source"]["generator"] == "far-off-parts/1" and r["dataset"]["items"] == 12000
    assert r["dataset"]["source"]["query_style"] == "cluster"  # the default: near the items, as user queries are
    (code,) = r["codes"]
    assert code["disk_bytes_per_item"] == 2 * 32 and not code["build_resumed"]  # float16 rows, no float32 copy
    assert not [f for f in (tmp_path / "work").rglob("vectors*.npy")]
    assert {p["mode"] for p in r["points"]} == {"warm", "cold"}
    # towerann plan's prediction, made before the run, beside what it measured (bytes per item: measured/planned)
    assert set(r["plan_before_run"]) == set(r["plan_vs_measured"]) == {"warm k=10", "cold k=10"}
    # (at 12k items the lists file's 2 MB alignment alone is 175 B/item of disk; the ratios mean something at 100M)
    assert all(0.5 < v["resident"] < 2 and v["disk"] > 0 for v in r["plan_vs_measured"].values())
    deepest = [p for p in r["points"] if p["params"] == {"nprobe": 64, "rerank": 80} and p["mode"] == "warm"]
    assert deepest and deepest[0]["recall"] >= 0.9  # against exact search over the generator's float32 vectors
    truth = list((tmp_path / "work").glob("truth-*.npy"))
    assert len(truth) == 1
    made = truth[0].stat().st_mtime_ns
    root = tmp_path / "served" / "root"
    assert main([*argv, "--publish", str(root)]) == 0
    again = json.loads((tmp_path / "pq-12000.json").read_text())
    assert again["codes"][0]["build_resumed"] and truth[0].stat().st_mtime_ns == made
    assert [p["recall"] for p in again["points"]] == [p["recall"] for p in r["points"]]
    _check_published(again, root, tmp_path / "work")


def _check_published(r, root, work):
    """--publish: a vectors-only bundle searching at the fastest warm setting that reached 0.95 (here
    the deepest), its re-rank rows the build's own file (hard link, not a copy), answering query vectors."""
    from towerann.serving.bundle import RetrievalBundle

    pub = r["published"]
    reached = [p for p in r["points"] if p["mode"] == "warm" and p["recall"] >= 0.95]
    assert pub["reached"] and pub["search"] == min(reached, key=lambda p: p["p50_ms"])["params"]
    bundle = RetrievalBundle.load(root)
    assert bundle.vectors_only and not bundle.has_user_tower and len(bundle.index) == 12000
    assert {k: bundle.index.search_defaults[k] for k in pub["search"]} == pub["search"]
    (built,) = list(work.rglob("assembled/rerank.npy"))
    assert (bundle.path / "rerank.npy").stat().st_ino == built.stat().st_ino
    queries = np.load(pub["queries_file"])
    assert queries.shape == (60, 32)
    got = bundle.index.search(queries[:5], 10).ids
    assert (got >= 0).all() and bundle.external_ids[got].tolist() == got.tolist()  # ids are the generator's rows


def test_bench_pq_catalog_embeds_part_by_part_and_publishes_a_bundle_with_its_model(tmp_path):
    """--set catalog: a synthetic catalog through a model trained on it, the item tower run a part at a
    time inside the resumable build (no vectors file), held-out users' queries; --publish gives a bundle
    with that model, so a user id is answered through the user tower from the published index."""
    from towerann.cli import main
    from towerann.data.dataset import read_items, read_users
    from towerann.features import open_store
    from towerann.features.loader import load_dataset_features
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    root = tmp_path / "served" / "root"
    argv = ["bench", "pq", "--set", "catalog", "--items", "12000", "--users", "300", "--part-size", "5000"]
    argv += ["--dim", "16", "--pq-m", "4", "--rerank-dtype", "float16", "--k", "10", "--nprobes", "8,64"]
    argv += ["--pools", "0,8", "--queries-n", "40", "--cold-queries", "3", "--train-seconds", "20"]
    argv += ["--out", str(tmp_path), "--work", str(tmp_path / "work"), "--publish", str(root)]
    assert main(argv) == 0
    r = json.loads((tmp_path / "pq-12000.json").read_text())
    src = r["dataset"]["source"]
    assert src["source"] == "catalog-parts/1" and src["part_size"] == 5000 and src["users"] == 300
    assert not [f for f in (tmp_path / "work").rglob("vectors*.npy")]  # the tower ran inside the build
    deepest = [p for p in r["points"] if p["params"] == {"nprobe": 64, "rerank": 80} and p["mode"] == "warm"]
    assert deepest and deepest[0]["recall"] >= 0.9  # against exact search over the tower's float32 vectors
    pub = r["published"]
    bundle = RetrievalBundle.load(root)
    assert bundle.has_user_tower and not bundle.vectors_only and bundle.model_version == src["model_version"]
    assert {k: bundle.index.search_defaults[k] for k in pub["search"]} == pub["search"] and pub["k"] == 10
    (work_data,) = list((tmp_path / "work").glob("catalog-*/dataset"))
    store = open_store("memory")
    load_dataset_features(store, work_data)
    user = int(read_users(work_data)["user_id"].iloc[0])
    answer = Retriever(BundleHolder(bundle), store).candidates(user, 10)
    assert not answer.degraded and len(answer.item_ids) == 10  # the user's features, through the user tower
    assert set(answer.item_ids) <= set(read_items(work_data, columns=["item_id"])["item_id"].tolist())


def test_a_cached_deeper_truth_answers_a_shallower_k_without_a_new_pass(tmp_path):
    """The exact top-k of a generated catalog is cached per depth; a shallower k is the first columns of a
    deeper one (no second pass: at 100M a pass is the item tower over the whole catalog), and a deeper k
    than any cached is a pass of its own."""
    from towerann.bench.compressed import generated_truth
    from towerann.data.synth_vectors import FarOffParts

    gen = FarOffParts(3000, 1000, 16, seed=0)
    queries = gen.queries(8, seed=1)
    deep = generated_truth(gen, queries, 20, tmp_path)
    shallow = generated_truth(gen, queries, 5, tmp_path)
    assert len(list(tmp_path.glob("truth-*.npy"))) == 1 and np.array_equal(shallow, deep[:, :5])
    vectors = np.concatenate([gen.part(i)[0] for i in range(len(gen.part_counts()))])
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    assert np.array_equal(np.sort(shallow, axis=1), np.sort(exact, axis=1))
    deeper = generated_truth(gen, queries, 30, tmp_path)
    assert len(list(tmp_path.glob("truth-*.npy"))) == 2 and np.array_equal(deeper[:, :20], deep)

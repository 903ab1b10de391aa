"""`towerann demo`: the whole job on embedded defaults, end to end, with a short report.

synthetic catalog -> train -> evaluate -> embed -> index (tuned on user vectors) -> feature store
-> HTTP server -> real requests, a click, the changed candidates -> stop.
Everything lands under --workdir (default towerann-demo/), which `towerann serve` then serves.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_WORKDIR = "towerann-demo"


class Steps:
    """Numbered steps with their wall time, printed as they finish."""

    def __init__(self, total: int):
        self.total, self.n = total, 0
        self.times: dict[str, float] = {}

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        print(f"[{self.n}/{self.total}] {title} ...", flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.times[title] = time.perf_counter() - t0
        print(f"      done in {self.times[title]:.1f} s", flush=True)
        return out


def run_demo(
    workdir: str | Path = DEFAULT_WORKDIR,
    items: int = 20_000,
    users: int = 4_000,
    seed: int = 0,
    train_seconds: float | None = 90.0,
    train_epochs: int | None = None,
    k: int = 100,
    target_recall: float = 0.95,
    search_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole job on a synthetic catalog; `search_params` go to the index (e.g. exact_below).
    Training stops after `train_seconds` or `train_epochs` (default: TrainConfig's), whichever comes first."""
    from towerann.data.synth import generate
    from towerann.embed.runner import embed_catalog
    from towerann.model.evaluate import evaluate
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    work = Path(workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # The layout of the config defaults (towerann.config), so that `towerann serve` serves it next.
    data, model_dir, vectors = work / "data", work / "models" / "demo", work / "vectors"
    index_root, store_path = work / "indexes", work / "features.sqlite"
    steps = Steps(7)
    report: dict[str, Any] = {"workdir": str(work), "items": items, "users": users, "k": k}

    steps.run(f"synthetic catalog: {items} items, {users} users", lambda: generate(data, items, users, seed=seed))
    model = steps.run(
        "train the two towers",
        lambda: train(
            data,
            model_dir,
            TowerConfig(),
            TrainConfig(max_seconds=train_seconds, seed=seed, **({"epochs": train_epochs} if train_epochs else {})),
            name="demo",
            progress=False,
        ),
    )
    report["model"] = {
        "version": model.version,
        "best_epoch": model.info["best_epoch"],
        "val_recall@100": round(model.info["val_recall@100"], 4),
    }
    ev = steps.run(
        "evaluate vs popularity and ALS (exact retrieval, held-out newest 20%)", lambda: evaluate(data, model_dir)
    )
    report["eval"] = {
        m: {key: round(ev[m][key], 4) for key in ("recall@10", "recall@100", "ndcg@10")}
        for m in ("two_tower", "popularity", "als")
    }
    steps.run("embed the catalog with the item tower", lambda: embed_catalog(model_dir, data, vectors, progress=False))
    report["embed_items_per_s"] = round(items / steps.times["embed the catalog with the item tower"])
    report["index"] = steps.run(
        f"index (auto: the fastest backend at recall@{k} >= {target_recall} on user queries); publish bundle",
        lambda: build_and_publish(model_dir, data, vectors, index_root, k, target_recall, seed, search_params),
    )
    report["features_users"] = steps.run(
        "feature store (embedded SQLite): load users and their recent history", lambda: load_features(data, store_path)
    )
    report["serve"] = steps.run(
        "serve over HTTP: requests, a click, the candidates move",
        lambda: serve_and_click(data, model_dir, index_root, store_path, k, seed),
    )
    report["step_seconds"] = {t: round(s, 1) for t, s in steps.times.items()}
    print_report(report)
    return report


def build_and_publish(
    model_dir: Path,
    data: Path,
    vectors: Path,
    index_root: Path,
    k: int,
    target_recall: float,
    seed: int,
    search_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the auto index (each candidate tuned on held-out users' queries, the fastest at the target
    kept), measure it against exact search on other queries, publish the bundle."""
    from towerann.data.vectors_dir import read_vectors
    from towerann.freshness.publish import publish_bundle
    from towerann.index.build import Tuning, build_index
    from towerann.index.tune import recall_at_k
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel

    vs = read_vectors(vectors)
    queries = heldout_user_queries(TwoTowerModel.load(model_dir), data, max_queries=1000, seed=seed)
    tuning_q, check_q = queries[::2], queries[1::2]  # tune on one half, report on the other
    t0 = time.perf_counter()
    ann = build_index(
        vs.vectors,
        vs.ids,
        vs.categories,
        vs.available,
        kind="auto",
        metric=vs.metric,
        params=search_params,
        tuning=Tuning(tuning_q, k, target_recall),
        auto_exact_items=0,
    )  # the ANN path even on a small catalog (the tests run 3k items)
    build_s = time.perf_counter() - t0  # every candidate's build + tuning
    tuned = ann.tuning
    assert tuned is not None  # a build with Tuning records it
    exact = build_index(vs.vectors, vs.ids, vs.categories, vs.available, kind="exact", metric=vs.metric)
    truth = exact.search(check_q, k).ids
    out = {
        "kind": ann.kind,
        "describe": ann.describe(),
        "build_s": round(build_s, 2),
        "params": tuned["params"],
        f"recall@{k}": round(recall_at_k(ann.search(check_q, k).ids, truth), 4),
        "candidates": [(c["kind"], c.get("recall"), c.get("p50_ms")) for c in tuned["auto"]["candidates"]],
    }
    for name, index in (("ann", ann), ("exact", exact)):
        lat = one_query_latencies_ms(index, check_q[:200], k)
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = (round(float(np.percentile(lat, p)), 3) for p in (50, 99))
    out["bundle"] = str(publish_bundle(index_root, model_dir, vs, index=ann))
    return out


def one_query_latencies_ms(index: Any, queries: np.ndarray, k: int) -> np.ndarray:
    index.search(queries[:5], k)  # warm up
    lat = np.empty(len(queries))
    for i in range(len(queries)):
        t0 = time.perf_counter()
        index.search(queries[i : i + 1], k)
        lat[i] = (time.perf_counter() - t0) * 1e3
    return lat


def load_features(data: Path, store_path: Path) -> int:
    from towerann.features import open_store
    from towerann.features.loader import load_dataset_features

    store = open_store("embedded", path=store_path)
    try:
        return load_dataset_features(store, data)
    finally:
        store.close()


def serve_and_click(
    data: Path, model_dir: Path, index_root: Path, store_path: Path, k: int, seed: int
) -> dict[str, Any]:
    """Start the real HTTP server, time requests, click one category's items, show the candidates move."""
    from towerann.client import Client
    from towerann.config import Config, FeaturesConfig, PathsConfig
    from towerann.data.dataset import read_interactions, read_items
    from towerann.server.server import start_background

    cfg = Config(
        paths=PathsConfig(model=str(model_dir), index=str(index_root)),
        features=FeaturesConfig(store="embedded", path=str(store_path)),
    )
    items = read_items(data)
    popularity = read_interactions(data)["item_id"].value_counts()
    items = items.assign(pop=items["item_id"].map(popularity).fillna(0)).sort_values("pop", ascending=False)
    category_of = dict(zip(items["item_id"].astype(str), items["category"]))
    user_ids = [str(u) for u in np.random.default_rng(seed).choice(read_interactions(data)["user_id"].unique(), 200)]

    handle = start_background(cfg)
    try:
        with Client(handle.url, timeout_s=10) as client:
            for user in user_ids[:10]:  # warm up
                client.candidates(user, k)
            lat, server_ms = [], []
            for user in user_ids:
                t0 = time.perf_counter()
                got = client.candidates(user, k)
                lat.append((time.perf_counter() - t0) * 1e3)
                server_ms.append(got.timings_ms)

            user = user_ids[0]

            def share(got: Any, category: str) -> float:
                return sum(category_of[str(i)] == category for i in got.item_ids) / k

            before = client.candidates(user, k)
            # Click the most popular items of the category this user is shown least of.
            big = items[items["available"]]["category"].value_counts()
            category = min(big[big >= 20].index, key=lambda c: share(before, c))
            clicked = items[(items["category"] == category) & items["available"]]["item_id"].head(5)
            t0 = time.perf_counter()
            for item in clicked:
                client.event(user, str(item))
            click_ms = (time.perf_counter() - t0) * 1e3 / len(clicked)
            after = client.candidates(user, k)
    finally:
        handle.stop()
    stage_p50 = {s: round(float(np.median([t[s] for t in server_ms])), 3) for s in server_ms[0]}
    return {
        "url": handle.url,
        "requests": len(lat),
        "http_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "http_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "server_stage_p50_ms": stage_p50,
        "click_ms": round(click_ms, 2),
        "user": user,
        "clicked_category": str(category),
        "share_before": share(before, category),
        "share_after": share(after, category),
        "top5_before": before.item_ids[:5],
        "top5_after": after.item_ids[:5],
        "versions": {"model": after.model_version, "index": after.index_version},
    }


def print_report(r: dict[str, Any]) -> None:
    print("\n=== towerann demo report ===")
    m = r["model"]
    print(f"model {m['version']}: best epoch {m['best_epoch']}, validation recall@100 {m['val_recall@100']}")
    print(f"{'method':<12}{'recall@10':>11}{'recall@100':>12}{'ndcg@10':>10}")
    for name, v in r["eval"].items():
        print(f"{name:<12}{v['recall@10']:>11.4f}{v['recall@100']:>12.4f}{v['ndcg@10']:>10.4f}")
    ix, k = r["index"], r["k"]
    print(f"embedding: {r['items']} items at {r['embed_items_per_s']} items/s")
    print(
        f"index: {ix['describe']} chosen by measurement from (kind, recall@{k}, p50 ms) {ix['candidates']} "
        f"in {ix['build_s']} s; search params {ix['params']}: recall@{k} {ix[f'recall@{k}']} "
        f"vs exact on other held-out user queries; "
        f"one query p50 {ix['ann_p50_ms']} ms (exact {ix['exact_p50_ms']} ms), "
        f"p99 {ix['ann_p99_ms']} ms (exact {ix['exact_p99_ms']} ms)"
    )
    s = r["serve"]
    print(
        f"serving at {s['url']} (model {s['versions']['model']}, index {s['versions']['index']}): "
        f"{s['requests']} POST /v1/candidates k={k}, p50 {s['http_p50_ms']} ms, p99 {s['http_p99_ms']} ms end to end; "
        f"server stages p50 {s['server_stage_p50_ms']} ms"
    )
    print(
        f"click: user {s['user']} clicked 5 items of {s['clicked_category']} ({s['click_ms']} ms per event); "
        f"its share of the top {k} went {s['share_before']:.0%} -> {s['share_after']:.0%}; "
        f"top 5 {s['top5_before']} -> {s['top5_after']}"
    )
    print(f"artifacts under {r['workdir']}/; `towerann serve` serves them (config defaults)")


def _run(args: argparse.Namespace) -> int:
    run_demo(
        args.workdir, items=args.items, users=args.users, seed=args.seed, train_seconds=args.train_seconds, k=args.k
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole job end to end on embedded defaults, with a short report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir", default=DEFAULT_WORKDIR, help=f"where everything is written (default {DEFAULT_WORKDIR}/)"
    )
    p.add_argument("--items", type=int, default=20_000, help="synthetic catalog size (default 20000)")
    p.add_argument("--users", type=int, default=4_000, help="synthetic users (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the catalog and the training (default 0)")
    p.add_argument("--train-seconds", type=float, default=90.0, help="training time budget (default 90)")
    p.add_argument("--k", type=int, default=100, help="candidates per request (default 100)")
    p.set_defaults(func=_run)

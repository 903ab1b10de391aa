"""The path production takes, served end to end: a tuned HNSW and a tuned ScaNN bundle over 24,000
items (above `exact_below`, 16,384, so a filter with many matches goes through the library), each with
the filter plan that publishing measured on its tuning queries. Over HTTP, unfiltered and filtered
answers (categories of under 100 items, ~1%, 15% and 40% of the catalog) are checked against exact
search done by hand.

Which path the plan gives a share depends on timings on the build machine; what every path must give
is checked: the filter holds exactly, and recall stays near the tuning target (0.95 on the tuning
queries; 0.9 asked here of held-out queries).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from towerann.config import Config, FeaturesConfig, PathsConfig, ServeConfig
from towerann.data.synth_vectors import far_off_catalog
from towerann.data.vectors_dir import read_vectors, write_vectors
from towerann.freshness.publish import publish_bundle
from towerann.index.build import Tuning
from towerann.index.snapshot import resolve
from towerann.model.model import model_version_of
from towerann.server.server import start_background

N, K, TARGET, HELD_OUT = 24_000, 100, 0.95, 20


@pytest.fixture(scope="module")
def catalog(bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """24k far-off vectors of the model's dim; categories are the generator's Zipf-sized clusters
    (shares well under 1% to a few %), then 'big' and 'wide' take 40% and 15% of the items at random."""
    dim = read_vectors(bundle_paths["vectors"]).dim
    cat = far_off_catalog(N, 200 + HELD_OUT, dim, seed=5, n_clusters=48)
    cats = cat.clusters.astype(np.int32)
    draw = np.random.default_rng(6).random(N)
    cats[draw < 0.4] = 48
    cats[(draw >= 0.4) & (draw < 0.55)] = 49
    names = [f"c{i}" for i in range(48)] + ["big", "wide"]
    available = np.random.default_rng(7).random(N) > 0.05  # a mask on every request, as in production
    ids = np.arange(1_000_000, 1_000_000 + N, dtype=np.int64)
    vectors = write_vectors(
        tmp_path_factory.mktemp("calibrated") / "vectors",
        cat.vectors,
        np.arange(N, dtype=np.int64),
        cats,
        available,
        names,
        model_version_of(bundle_paths["model"]),
        ids,
    )
    return {
        "vectors": cat.vectors,
        "ids": ids,
        "cats": cats,
        "names": names,
        "available": available,
        "dir": vectors,
        "tuning": cat.queries[:200],
        "held_out": cat.queries[200:],
    }


@pytest.fixture(scope="module", params=["hnsw", "scann"])
def served(
    request: pytest.FixtureRequest,
    catalog: dict[str, Any],
    bundle_paths: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    fixed_tuner_costs_module: None,
) -> Iterator[dict[str, Any]]:
    """Tuned with the fixed cost model (tests/conftest.py): at 24k items ScaNN reaches 0.95 at about exact
    search's time, so with a stopwatch the settings reaching it were refused as slower than exact on one
    CI run (tuned to recall 0.876, held-out 0.889) and kept on the next."""
    kind = request.param
    if kind == "scann" and importlib.util.find_spec("scann") is None:
        if os.environ.get("CI"):
            pytest.fail("scann is not installed; CI installs towerann[scann]")
        pytest.skip("scann is not installed (pip install 'towerann[scann]')")
    root = tmp_path_factory.mktemp(f"calibrated-{kind}") / "indexes"
    publish_bundle(root, bundle_paths["model"], catalog["dir"], kind=kind, tuning=Tuning(catalog["tuning"], K, TARGET))
    cfg = Config(
        serve=ServeConfig(max_k=K),
        paths=PathsConfig(index=str(root), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store="memory"),
    )
    handle = start_background(cfg)
    try:
        yield {"kind": kind, "url": handle.url, "root": root}
    finally:
        handle.stop()


def exact_by_hand(c: dict[str, Any], q: np.ndarray, allowed: np.ndarray) -> set[int]:
    scores = np.where(allowed, c["vectors"] @ q, -np.inf)
    top = np.argsort(-scores, kind="stable")[:K]
    return {int(c["ids"][i]) for i in top if np.isfinite(scores[i])}


def test_a_tuned_bundle_with_its_filter_plan_answers_like_exact_search(
    served: dict[str, Any], catalog: dict[str, Any]
) -> None:
    import json

    manifest = json.loads((resolve(served["root"]) / "manifest.json").read_text())
    defaults = manifest["search_defaults"]
    assert manifest["backend"] == served["kind"] and manifest["tuning"]["k"] == K
    assert defaults["exact_below"] == 0 and defaults["filter_plan"], defaults  # calibrated: the plan decides
    assert {row[2] for row in defaults["filter_plan"]} <= {"exact", "filtered", "post", "partition"}

    c = catalog
    counts = np.bincount(c["cats"][c["available"]], minlength=len(c["names"]))
    order = np.argsort(counts)
    rare, mid = c["names"][int(order[0])], c["names"][int(order[len(order) // 2])]
    assert counts[order[0]] < K  # fewer matches than k: answered by exact search whatever the plan says
    filters: list[tuple[str, list[str] | None, np.ndarray]] = [("none", None, c["available"])]
    for label, name in (("rare", rare), ("mid", mid), ("wide", "wide"), ("big", "big")):
        filters.append((label, [name], c["available"] & (c["cats"] == c["names"].index(name))))
    recalls: dict[str, list[float]] = {label: [] for label, _, _ in filters}
    with httpx.Client(base_url=served["url"], timeout=60) as http:
        for q in c["held_out"]:
            for label, categories, allowed in filters:
                body: dict[str, Any] = {"query_vector": q.tolist(), "k": K}
                if categories:
                    body["filter"] = {"categories": categories}
                r = http.post("/v1/candidates", json=body)
                assert r.status_code == 200, r.text
                got = [x["item_id"] for x in r.json()["candidates"]]
                want = exact_by_hand(c, q, allowed)
                assert len(got) == len(set(got)) == min(K, int(allowed.sum())), label
                pos = np.searchsorted(c["ids"], got)
                assert allowed[pos].all(), f"{label}: an item outside the filter or unavailable was returned"
                recalls[label].append(len(want.intersection(got)) / len(want))
    mean = {label: float(np.mean(v)) for label, v in recalls.items()}
    print(f"\n{served['kind']}: plan {defaults['filter_plan']}; held-out recall@{K} {mean}")
    assert all(r >= 0.9 for r in mean.values()), mean
    assert mean["rare"] == 1.0


def test_index_build_plans_filters_as_publishing_does(
    catalog: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`towerann index build --recall --queries` (issue 26: it tuned unfiltered search and recorded
    `filter_plan: []`, so a filter keeping 10% of the catalog got recall 0.877 against a promised 0.95):
    the snapshot carries the plan measured on the tuning queries, and searched as built, filters keeping
    ~10% and 15% of the catalog hold recall on held-out queries."""
    import argparse

    from towerann.index import Filter, load
    from towerann.index.commands import add_commands
    from towerann.index.filter_plan import categories_for_share

    np.save(tmp_path / "q.npy", catalog["tuning"])
    parser = argparse.ArgumentParser(prog="towerann")
    add_commands(parser.add_subparsers(dest="command"))
    argv = ["index", "build", "--vectors", str(catalog["dir"]), "--kind", "hnsw", "--out", str(tmp_path / "ix")]
    args = parser.parse_args([*argv, "--recall", str(TARGET), "--k", str(K), "--queries", str(tmp_path / "q.npy")])
    assert args.func(args) == 0
    assert "filter plan at k=100" in capsys.readouterr().out
    ix = load(tmp_path / "ix")
    assert ix.search_defaults["filter_plan"] and ix.search_defaults["exact_below"] == 0
    assert ix.filter_calibration is not None and ix.filter_calibration["target"] == TARGET
    clusters, _ = categories_for_share(
        np.where(catalog["cats"] < 48, catalog["cats"], -1), 0.1, np.random.default_rng(3)
    )
    q = catalog["held_out"]
    for codes in (clusters, [catalog["names"].index("wide")]):
        f = Filter(categories=frozenset(codes))
        got, truth = ix.search(q, K, filter=f).ids, ix.exact_search(q, K, filter=f).ids
        recall = float(np.mean([len(np.intersect1d(g, t)) / len(t[t >= 0]) for g, t in zip(got, truth)]))
        assert recall >= 0.9, (codes, recall, ix.search_defaults["filter_plan"])

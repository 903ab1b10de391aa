"""Settings chosen on validation: the search is deterministic, never reads the test split, keeps to its
budget, lands in the manifest; and the generator's popularity_skew moves the popularity curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towerann.cli import main
from towerann.data.dataset import read_interactions, read_items, read_users, write_dataset
from towerann.data.synth import generate
from towerann.model.evaluate import evaluate, tune_als
from towerann.model.hparam_search import SearchConfig, search
from towerann.model.prepare import TEST, prepare, time_split
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig

TOWER = TowerConfig(dim=16, id_dim=8, category_dim=4, attr_dim=4, hidden=32, history_len=5)
CFG = TrainConfig(epochs=2, patience=2, batch_size=256)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # >= 12 interactions per user, so every user has validation (10%) and test (20%) interactions
    return generate(
        tmp_path_factory.mktemp("search") / "ds", n_items=600, n_users=150, seed=2, interactions_per_user=(12, 30)
    )


@pytest.fixture(scope="module")
def corrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset with every test-period click moved to one item (same counts, so the same split)."""
    inter = read_interactions(data).sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    split = time_split(pd.factorize(inter["user_id"])[0], 0.1, 0.2)
    assert (split == TEST).sum() > 100
    inter.loc[split == TEST, "item_id"] = int(read_items(data)["item_id"].iloc[-1])
    return write_dataset(
        tmp_path_factory.mktemp("search") / "bad",
        read_items(data),
        read_users(data),
        inter,
        source="corrupted test split",
    )


def _scores(model) -> list[tuple]:  # type: ignore[no-untyped-def]
    return [
        (t["temperature"], t["id_dim"], t["val_recall@100"], t["best_epoch"]) for t in model.info["search"]["trials"]
    ]


def test_search_is_deterministic_for_a_seed(data: Path) -> None:
    a = search(data, TOWER, CFG, SearchConfig(budget_s=600, max_trials=2), progress=False)
    b = search(data, TOWER, CFG, SearchConfig(budget_s=600, max_trials=2), progress=False)
    assert _scores(a) == _scores(b)
    assert a.info["search"]["chosen"] == b.info["search"]["chosen"]
    va, vb = a.encode_items(read_items(data)), b.encode_items(read_items(data))
    assert np.array_equal(va, vb)
    trials = a.info["search"]["trials"]
    assert trials[0]["weight_decay"] == CFG.weight_decay and trials[1]["weight_decay"] != CFG.weight_decay
    best = max(t["val_recall@100"] for t in trials)
    assert a.info["search"]["val_recall@100"] == best  # the kept model is the best trial's
    assert a.info["val_recall@100"] == pytest.approx(best, abs=1e-6)


def test_search_and_als_tuning_never_read_the_test_split(data: Path, corrupted: Path) -> None:
    good = search(data, TOWER, CFG, SearchConfig(budget_s=600, max_trials=2), progress=False)
    bad = search(corrupted, TOWER, CFG, SearchConfig(budget_s=600, max_trials=2), progress=False)
    assert _scores(good) == _scores(bad)
    grid = {"factors": (16, 32), "regularization": (0.01, 1.0), "alpha": (1.0,)}
    chosen, points = tune_als(prepare(data, 5), grid=grid)
    assert len(points) == 4 and (chosen, points) == tune_als(prepare(corrupted, 5), grid=grid)
    # the corruption is real: the same model scores differently on the two test splits
    assert (
        evaluate(data, good, (100,), baselines=False)["two_tower"]["recall@100"]
        != evaluate(corrupted, good, (100,), baselines=False)["two_tower"]["recall@100"]
    )


def test_search_keeps_to_its_budget(data: Path) -> None:
    one = search(data, TOWER, CFG, SearchConfig(budget_s=0.0, max_trials=10), progress=False)
    assert len(one.info["search"]["trials"]) == 1 and one.info["search"]["stopped_by"].startswith("budget_s")
    two = search(data, TOWER, CFG, SearchConfig(budget_s=600, max_trials=2), progress=False)
    assert len(two.info["search"]["trials"]) == 2 and two.info["search"]["stopped_by"] == "max_trials (2)"


def test_train_search_cli_writes_trials_to_the_manifest(data: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m"
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--dim",
            "16",
            "--history",
            "5",
            "--epochs",
            "1",
            "--search",
            "--search-trials",
            "2",
        ]
    )
    assert rc == 0
    found = json.loads((out / "manifest.json").read_text())["info"]["search"]
    assert len(found["trials"]) == 2 and found["scored_on"] == "validation split"
    assert set(found["chosen"]) == {"temperature", "lr", "id_dim", "logq_weight", "weight_decay", "dim"}
    assert "search: 2 trials" in capsys.readouterr().out


def _head_share(path: Path) -> float:
    counts = read_interactions(path)["item_id"].value_counts()
    return float(counts.iloc[: len(read_items(path)) // 100].sum() / counts.sum())


def test_popularity_skew_moves_clicks_to_or_from_the_head(tmp_path: Path) -> None:
    shares = {
        s: _head_share(generate(tmp_path / f"s{s}", n_items=2000, n_users=300, seed=4, popularity_skew=s))
        for s in (0.5, 1.0, 2.0)
    }
    assert shares[0.5] < shares[1.0] < shares[2.0], shares
    manifest = json.loads((tmp_path / "s2.0" / "manifest.json").read_text())
    assert manifest["params"]["popularity_skew"] == 2.0
    assert "popularity_skew" not in json.loads((tmp_path / "s1.0" / "manifest.json").read_text())["params"]

"""The two-tower model: known-answer training, cold start, export parity, artifact checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towerann.artifacts import write_manifest
from towerann.data.dataset import read_interactions, read_items
from towerann.data.synth import generate
from towerann.errors import ArtifactError
from towerann.model.evaluate import evaluate
from towerann.model.export import UserEncoder
from towerann.model.model import TwoTowerModel
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, train


@pytest.fixture(scope="module")
def one_category_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Users who only ever click items of one category: the known answer is that category."""
    out = tmp_path_factory.mktemp("data") / "ds"
    return generate(
        out,
        n_items=1500,
        n_users=400,
        seed=3,
        n_categories=8,
        categories_per_user=(1, 1),
        interactions_per_user=(20, 40),
    )


@pytest.fixture(scope="module")
def model_dir(one_category_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "m"
    train(
        one_category_data,
        out,
        TowerConfig(dim=32, hidden=64, history_len=10),
        TrainConfig(epochs=6, patience=6),
        progress=False,
    )
    return out


def _user_category(data: Path) -> dict:
    inter = read_interactions(data)
    cats = read_items(data).set_index("item_id")["category"]
    inter["category"] = cats.loc[inter["item_id"]].to_numpy()
    per_user = inter.groupby("user_id")["category"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else None)
    return per_user.dropna().to_dict()


def test_users_of_one_category_get_that_category_on_top(one_category_data: Path, model_dir: Path) -> None:
    model = TwoTowerModel.load(model_dir)
    items = read_items(one_category_data)
    vectors = model.encode_items(items)
    enc = UserEncoder(model, model_dir)
    inter = read_interactions(one_category_data).sort_values("timestamp", ascending=False)
    cat_code = dict(zip(items["item_id"].astype(str), model.schema.categories.encode(items["category"].to_numpy())))
    user_cat = _user_category(one_category_data)
    assert len(user_cat) > 100
    shares = []
    for user, category in list(user_cat.items())[:150]:
        hist = [(str(i), cat_code[str(i)]) for i in inter.loc[inter["user_id"] == user, "item_id"].head(10)]
        q = enc.encode(str(user), {}, hist)
        top = np.argsort(-(vectors @ q))[:10]
        shares.append(float((items["category"].to_numpy()[top] == category).mean()))
    # 8 categories: chance would put ~12% of the top 10 in the user's category
    assert np.mean(shares) >= 0.8, f"mean share of the user's own category in the top 10: {np.mean(shares):.2f}"


def test_eval_beats_popularity_and_reports_all_methods(one_category_data: Path, model_dir: Path) -> None:
    result = evaluate(one_category_data, model_dir)
    for method in ("two_tower", "popularity", "als"):
        assert {"recall@10", "recall@100", "recall@1000", "ndcg@10"} <= result[method].keys()
    assert result["two_tower"]["recall@100"] > result["popularity"]["recall@100"]


def test_cold_start_user_and_unknown_history_items(model_dir: Path, one_category_data: Path) -> None:
    model = TwoTowerModel.load(model_dir)
    enc = UserEncoder(model, model_dir)
    cold = enc.encode("never-seen-user", {}, [])
    assert np.isfinite(cold).all() and abs(np.linalg.norm(cold) - 1) < 1e-4
    # history of items the model has never seen, in a known category: still a valid, different vector
    unknown = enc.encode("never-seen-user", {}, [("no-such-item", 1), ("another-new-item", 1)])
    assert np.isfinite(unknown).all() and not np.allclose(unknown, cold)
    # a cold user who clicks items of one category is steered toward that category
    items = read_items(one_category_data)
    vectors = model.encode_items(items)
    codes = model.schema.categories.encode(items["category"].to_numpy())
    target = codes[0]
    clicked = [(str(i), int(target)) for i in items["item_id"].to_numpy()[codes == target][:5]]
    warm = enc.encode("never-seen-user", {}, clicked)
    top = np.argsort(-(vectors @ warm))[:20]
    assert (codes[top] == target).mean() >= 0.6


@pytest.mark.parametrize("runtime", ["torchscript", "torch"])
def test_exported_user_tower_matches_other_runtimes(model_dir: Path, runtime: str) -> None:
    model = TwoTowerModel.load(model_dir)
    onnx = UserEncoder(model, model_dir, runtime="onnx")
    other = UserEncoder(model, model_dir, runtime=runtime)
    hist = [(str(i), 1 + i % 3) for i in range(7)]
    np.testing.assert_allclose(
        onnx.encode("5", {"age": 31.0, "country": "de"}, hist),
        other.encode("5", {"age": 31.0, "country": "de"}, hist),
        atol=1e-5,
    )


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(model_dir, dst)
    return dst


def test_load_round_trip_gives_identical_vectors(model_dir: Path, one_category_data: Path, tmp_path: Path) -> None:
    items = read_items(one_category_data).head(50)
    a = TwoTowerModel.load(model_dir)
    b = TwoTowerModel.load(_copy(model_dir, tmp_path))
    assert a.version == b.version
    np.testing.assert_array_equal(a.encode_items(items), b.encode_items(items))


def test_manifest_with_wrong_dim_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["dim"] = 64
    write_manifest(d / "manifest.json", m)
    with pytest.raises(ArtifactError, match="dim"):
        TwoTowerModel.load(d)


def test_tampered_weights_are_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path)
    with open(d / "weights.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="checksum"):
        TwoTowerModel.load(d)


def test_other_artifacts_and_future_formats_are_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    write_manifest(d / "manifest.json", m | {"format_version": 99})
    with pytest.raises(ArtifactError, match="format_version"):
        TwoTowerModel.load(d)
    write_manifest(d / "manifest.json", m | {"kind": "vectors"})
    with pytest.raises(ArtifactError, match="expected a model manifest"):
        TwoTowerModel.load(d)
    with pytest.raises(ArtifactError, match="missing"):
        TwoTowerModel.load(tmp_path / "nowhere")


def test_interactions_with_unknown_items_are_ignored_not_fatal(one_category_data: Path, tmp_path: Path) -> None:
    from towerann.data.dataset import read_users, write_dataset

    inter = read_interactions(one_category_data)
    extra = inter.head(5).assign(item_id=10_000_000)
    ds = write_dataset(
        tmp_path / "ds",
        read_items(one_category_data),
        read_users(one_category_data),
        pd.concat([inter, extra], ignore_index=True),
        source="test",
    )
    model = train(ds, None, TowerConfig(dim=16, hidden=32, history_len=5), TrainConfig(epochs=1), progress=False)
    assert model.info["train_interactions"] > 0

"""The synthetic generator: determinism, layout, and the structure the model is meant to learn."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from towerann.data.dataset import iter_item_batches, read_interactions, read_items, read_users, validate_dataset
from towerann.data.synth import WINDOW_S, default_categories, generate
from towerann.errors import ArtifactError, ConfigError

FILES = ("items.parquet", "users.parquet", "interactions.parquet", "manifest.json")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "ds", n_items=3000, n_users=400, seed=7)


def with_categories(path: Path) -> pd.DataFrame:
    return read_interactions(path).merge(read_items(path, columns=["item_id", "category"]), on="item_id")


def test_layout_and_features(small: Path) -> None:
    info = validate_dataset(small, verify_checksums=True)
    assert info["item_numeric"] == ["price", "quality"] and info["item_categorical"] == ["brand"]
    assert info["user_numeric"] == ["age"] and info["user_categorical"] == ["country"]
    assert info["manifest"]["seed"] == 7 and info["manifest"]["source"] == "synthetic"
    items, users, inter = read_items(small), read_users(small), read_interactions(small)
    assert items["item_id"].tolist() == list(range(3000))
    assert users["user_id"].tolist() == list(range(400))
    assert items["category"].nunique() == default_categories(3000) == 8
    assert 0.93 < items["available"].mean() < 0.995
    assert (items["price"] > 0).all() and items["quality"].between(0, 1).all()
    assert inter["item_id"].isin(items["item_id"]).all() and inter["user_id"].isin(users["user_id"]).all()


def test_interactions_per_user_and_time_order(small: Path) -> None:
    inter = read_interactions(small)
    per_user = inter.groupby("user_id").size()
    assert len(per_user) == 400 and per_user.min() >= 5 and per_user.max() <= 60
    assert inter.groupby("user_id")["timestamp"].apply(lambda s: s.is_monotonic_increasing and s.is_unique).all()
    assert inter["timestamp"].max() - inter["timestamp"].min() <= WINDOW_S


def test_popularity_is_skewed(small: Path) -> None:
    counts = read_interactions(small)["item_id"].value_counts()
    top1pct = counts.iloc[:30].sum() / counts.sum()
    assert top1pct > 0.1  # uniform would give 1%


def test_brands_belong_to_categories(small: Path) -> None:
    items = read_items(small)
    local = items[~items["brand"].str.startswith("global_")]
    assert (local.groupby("brand")["category"].nunique() == 1).all()
    assert 0.8 < len(local) / len(items) < 0.97


def test_users_mix_few_categories(small: Path) -> None:
    per_user = with_categories(small).groupby("user_id")["category"].nunique()
    assert per_user.max() <= 3 and (per_user > 1).any()


def test_one_category_per_user_is_respected(tmp_path: Path) -> None:
    path = generate(tmp_path / "one", n_items=2000, n_users=200, seed=3, categories_per_user=(1, 1))
    per_user = with_categories(path).groupby("user_id")["category"].nunique()
    assert len(per_user) == 200 and (per_user == 1).all()


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(n_items=1500, n_users=150, interactions_per_user=(3, 20))
    a, b = generate(tmp_path / "a", seed=11, **kw), generate(tmp_path / "b", seed=11, **kw)
    c = generate(tmp_path / "c", seed=12, **kw)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    pd.testing.assert_frame_equal(read_interactions(a), read_interactions(b))
    for reader in (read_items, read_users, read_interactions):
        assert not reader(a).equals(reader(c))


def test_streams_in_row_groups(tmp_path: Path) -> None:
    path = generate(tmp_path / "big", n_items=70_000, n_users=10, seed=0, interactions_per_user=(1, 2))
    sizes = [b.num_rows for b in iter_item_batches(path, batch_size=65536, columns=["item_id"])]
    assert sizes == [65536, 70_000 - 65536]


def test_bad_parameters_and_existing_output(tmp_path: Path, small: Path) -> None:
    with pytest.raises(ConfigError, match="categories_per_user"):
        generate(tmp_path / "x", 100, 10, categories_per_user=(2, 1))
    with pytest.raises(ConfigError, match="categories_per_user max 5 exceeds"):
        generate(tmp_path / "x", 100, 10, n_categories=4, categories_per_user=(1, 5))
    with pytest.raises(ConfigError, match="categories must be between"):
        generate(tmp_path / "x", 10, 10, n_categories=11)
    with pytest.raises(ConfigError, match="interactions_per_user"):
        generate(tmp_path / "x", 100, 10, interactions_per_user=(0, 3))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArtifactError, match="already exists"):
        generate(small, 100, 10)
    again = generate(tmp_path / "y", 100, 10, seed=1)
    generate(again, 200, 10, seed=1, overwrite=True)
    assert validate_dataset(again)["counts"]["items"] == 200

"""Model quality on real data: MovieLens-100k, two-tower vs popularity vs implicit's ALS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from towerann.data.movielens import convert
from towerann.model.evaluate import evaluate
from towerann.model.train import TrainConfig, train

ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"


@pytest.mark.slow
def test_two_tower_beats_popularity_by_20_percent_on_ml100k(tmp_path: Path) -> None:
    if not ML100K.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{ML100K} is missing in CI")
        pytest.skip(f"{ML100K} not found (the shared data folder is not beside this checkout)")
    data = convert(ML100K, tmp_path / "ml")
    train(data, tmp_path / "model", cfg=TrainConfig(epochs=15), progress=False)
    result = evaluate(data, tmp_path / "model")
    tt, pop, als = result["two_tower"], result["popularity"], result["als"]
    assert tt["users"] == 943
    assert tt["recall@100"] >= 1.2 * pop["recall@100"], result
    assert 0 < als["recall@100"] <= 1

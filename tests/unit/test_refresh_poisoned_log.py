"""A delta log that holds an upsert the item tower cannot embed (written before writes were checked)
must not fail every rebuild: the rebuild skips that entry, folds in the rest and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from towerann.data.dataset import read_items
from towerann.freshness.deltalog import open_delta_log
from towerann.freshness.refresh import refresh
from towerann.serving.bundle import RetrievalBundle


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from towerann.bench.serve import prepare

    # same place and sizes as tests/integration/conftest.py, so one session builds it once
    return prepare(tmp_path_factory.getbasetemp() / "serving-bundle", items=2000, users=1000, dim=32, epochs=2,
                   kind="exact")


def test_refresh_skips_an_unembeddable_upsert_and_folds_the_rest(paths: dict[str, Path], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    row = read_items(paths["data"]).iloc[0].to_dict()
    good = {**row, "item_id": "990001", "available": True}
    poison = {**good, "item_id": "990002", "price": 1e300}  # finite, but the tower's float32 overflows
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    delta.append("upsert", "990002", poison)
    delta.append("upsert", "990001", good)
    with caplog.at_level(logging.ERROR, logger="towerann.freshness.refresh"):
        out = refresh(paths["data"], paths["model"], tmp_path / "indexes", delta, kind="exact", recall=None)
    delta.close()
    bundle = RetrievalBundle.load(out["path"])
    assert bundle.holds("990001") and not bundle.holds("990002")
    assert out["items"] == 2001 and out["delta_seq"] == 2
    assert "990002" in caplog.text and "skipped" in caplog.text

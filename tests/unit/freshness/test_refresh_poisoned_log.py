"""A delta log that holds an upsert the item tower cannot embed (written before writes were checked), or
an op this version does not know, must not fail every rebuild: the rebuild skips that entry, folds in the
rest and says so; a replay onto a served bundle does the same."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from towerann.data.dataset import read_items
from towerann.freshness.deltalog import open_delta_log
from towerann.freshness.publish import publish_bundle
from towerann.freshness.refresh import refresh
from towerann.serving.bundle import RetrievalBundle


def test_refresh_skips_an_unembeddable_upsert_and_folds_the_rest(
    serving_bundle: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    row = read_items(serving_bundle["data"]).iloc[0].to_dict()
    good = {**row, "item_id": "990001", "available": True}
    poison = {**good, "item_id": "990002", "price": 1e300}  # finite, but the tower's float32 overflows
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    delta.append("upsert", "990002", poison)
    delta.append("upsert", "990001", good)
    with caplog.at_level(logging.ERROR, logger="towerann.freshness.refresh"):
        out = refresh(
            serving_bundle["data"], serving_bundle["model"], tmp_path / "indexes", delta, kind="exact", recall=None
        )
    delta.close()
    bundle = RetrievalBundle.load(out["path"])
    assert bundle.holds("990001") and not bundle.holds("990002")
    assert out["items"] == 2001 and out["delta_seq"] == 2
    assert "990002" in caplog.text and "skipped" in caplog.text


def test_refresh_and_replay_skip_an_upsert_of_near_zero_norm(
    serving_bundle: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """price 1e38 is finite, but the item tower maps it to the zero vector: a log written before writes
    were checked for it may hold one; neither a rebuild nor a replay puts it in the index."""
    from towerann.freshness.live import replay

    row = read_items(serving_bundle["data"]).iloc[0].to_dict()
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    delta.append("upsert", "990003", {**row, "item_id": "990003", "available": True, "price": 1e38})
    with caplog.at_level(logging.ERROR, logger="towerann.freshness"):
        out = refresh(
            serving_bundle["data"], serving_bundle["model"], tmp_path / "indexes", delta, kind="exact", recall=None
        )
        assert not RetrievalBundle.load(out["path"]).holds("990003") and out["items"] == 2000
        older = RetrievalBundle.load(
            publish_bundle(tmp_path / "older", serving_bundle["model"], serving_bundle["vectors"], kind="exact")
        )
        assert replay(older, delta) == 1 and not older.holds("990003")
    delta.close()
    skipped = [r.getMessage() for r in caplog.records if "'990003'" in r.getMessage()]
    assert len(skipped) == 2 and all("zero norm" in m for m in skipped), skipped


def _log_with_an_unknown_op(path: Path, item_id: str) -> None:
    """A log row that no writer of this version makes (a newer version's op, or a hand-edited file)."""
    import sqlite3

    open_delta_log("embedded", path).close()  # the table, as the log creates it
    db = sqlite3.connect(path)
    db.execute("INSERT INTO delta (ts, op, item_id, payload) VALUES (0, 'zap', ?, '{}')", (item_id,))
    db.commit()
    db.close()


def test_replay_skips_an_unknown_op_with_one_warning(
    serving_bundle: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning line per bundle it is skipped on: a replay at load, and another worker's catch-up."""
    from towerann.freshness.live import ItemWriter, replay
    from towerann.serving.holder import BundleHolder

    root = publish_bundle(tmp_path / "indexes", serving_bundle["model"], serving_bundle["vectors"], kind="exact")
    _log_with_an_unknown_op(tmp_path / "delta.sqlite", "1")
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    bundle, other = RetrievalBundle.load(root), RetrievalBundle.load(root)
    n = len(bundle.index)
    with caplog.at_level(logging.WARNING, logger="towerann.freshness.live"):
        assert replay(bundle, delta) == 1  # past the entry: it is not tried again
        assert ItemWriter(BundleHolder(other), delta, shared=True).catch_up() == 1  # the other workers' path
    delta.close()
    for b in (bundle, other):
        assert b.holds("1") and len(b.index) == n and b.delta_seq == 1  # was deleted before the fix
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("'zap'" in r.getMessage() and "'1'" in r.getMessage() for r in warnings)


def test_refresh_skips_an_unknown_op_with_one_warning(
    serving_bundle: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _log_with_an_unknown_op(tmp_path / "delta.sqlite", "1")
    delta = open_delta_log("embedded", tmp_path / "delta.sqlite")
    with caplog.at_level(logging.WARNING, logger="towerann.freshness"):
        out = refresh(
            serving_bundle["data"], serving_bundle["model"], tmp_path / "indexes", delta, kind="exact", recall=None
        )
    delta.close()
    assert RetrievalBundle.load(out["path"]).holds("1") and out["items"] == 2000 and out["delta_seq"] == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "'zap'" in warnings[0].getMessage(), [r.getMessage() for r in warnings]

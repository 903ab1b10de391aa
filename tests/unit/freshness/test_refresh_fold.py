"""fold_catalog: the catalog a rebuild embeds is the catalog with the delta log applied, in order."""

from __future__ import annotations

import pandas as pd

from towerann.freshness.deltalog import DeltaEntry
from towerann.freshness.live import fold_catalog


def _items() -> pd.DataFrame:
    return pd.DataFrame(
        {"item_id": [1, 2, 3], "category": ["a", "b", "a"], "available": [True, True, True], "price": [1.0, 2.0, 3.0]}
    )


def _e(seq: int, op: str, key: str, **payload: object) -> DeltaEntry:
    return DeltaEntry(seq, op, key, dict(payload))


def test_upserts_availability_and_deletes_fold_in_order() -> None:
    entries = [
        _e(1, "upsert", "4", item_id="4", category="c", available=True, price=4.0),  # new item
        _e(2, "upsert", "2", item_id="2", category="b", available=True, price=20.0),  # changed features
        _e(3, "available", "1", available=False),
        _e(4, "delete", "3"),
        _e(5, "available", "4", available=False),
        _e(6, "upsert", "5", item_id="5", category="c", available=True, price=5.0),
        _e(7, "delete", "5"),  # added, then deleted
    ]
    out = fold_catalog(_items(), entries).set_index("item_id")
    assert sorted(out.index.tolist()) == [1, 2, 4]
    assert out.loc[2, "price"] == 20.0
    assert not out.loc[1, "available"] and not out.loc[4, "available"]
    assert out.loc[4, "category"] == "c" and out.index.dtype.kind == "i"


def test_delete_then_upsert_brings_an_item_back() -> None:
    entries = [_e(1, "delete", "1"), _e(2, "upsert", "1", item_id="1", category="z", available=True, price=9.0)]
    out = fold_catalog(_items(), entries).set_index("item_id")
    assert out.loc[1, "category"] == "z" and len(out) == 3

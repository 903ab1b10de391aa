"""Loading a dataset's users and interaction history into a store, and the CLI around it."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from towerann.errors import ConfigError, DataError
from towerann.features import open_store
from towerann.features.commands import add_commands
from towerann.features.loader import load_dataset_features


def _write_dataset(d) -> None:
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "user_id": np.array([1, 2, 3], dtype=np.int64),
            "age": [25.0, np.nan, 40.0],  # NaN = missing, not a value
            "gender": pd.Categorical(["F", "M", None]),
            "premium": [True, False, True],
            "visits": np.array([3, 0, 7], dtype=np.int32),
        }
    ).to_parquet(d / "users.parquet")
    # user 1: 5 items, out of time order, with a timestamp tie (later row counts as newer)
    # user 4: no users row, only history; user 3: no history
    rows = [(1, 10, 100), (1, 11, 300), (2, 20, 50), (1, 12, 200), (1, 13, 400), (4, 40, 10), (1, 14, 300), (2, 21, 60)]
    pd.DataFrame(
        {
            "user_id": np.array([r[0] for r in rows], dtype=np.int64),
            "item_id": np.array([r[1] for r in rows], dtype=np.int64),
            "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
            "weight": np.ones(len(rows), dtype=np.float32),
        }
    ).to_parquet(d / "interactions.parquet")


def test_loader_static_and_recent_items_newest_first_capped(tmp_path) -> None:
    _write_dataset(tmp_path / "ds")
    store = open_store("memory")
    assert load_dataset_features(store, tmp_path / "ds", recent_n=3, batch_size=2) == 4
    u1, u2, u3, u4 = store.get(["1", "2", "3", "4"])
    assert u1.static == {"age": 25.0, "gender": "F", "premium": 1.0, "visits": 3.0}
    assert u1.recent_items == ("13", "14", "11")  # 400, then the 300 tie (later row first), capped at 3
    assert u2.static == {"gender": "M", "premium": 0.0, "visits": 0.0} and u2.recent_items == ("21", "20")
    assert u3.known and u3.static == {"age": 40.0, "premium": 1.0, "visits": 7.0} and u3.recent_items == ()
    assert u4.known and u4.static == {} and u4.recent_items == ("40",)
    assert store.get_one("5").known is False
    assert load_dataset_features(store, tmp_path / "ds", recent_n=0) == 3  # no history: users.parquet only
    assert store.get_one("1").recent_items == ()


def test_loader_rejects_bad_inputs_naming_file_and_column(tmp_path) -> None:
    store = open_store("memory")
    with pytest.raises(DataError, match="not found"):
        load_dataset_features(store, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="users.parquet"):
        load_dataset_features(store, tmp_path / "empty")
    with pytest.raises(ConfigError, match="recent_n"):
        load_dataset_features(store, tmp_path, recent_n=-1)

    bad = tmp_path / "bad"
    _write_dataset(bad)
    pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2]}).to_parquet(bad / "interactions.parquet")
    with pytest.raises(DataError, match=r"interactions\.parquet.*timestamp"):
        load_dataset_features(store, bad)
    pd.DataFrame({"user_id": [1, 1], "age": [1.0, 2.0]}).to_parquet(bad / "users.parquet")
    with pytest.raises(DataError, match=r"users\.parquet.*'1'.*more than once"):
        load_dataset_features(store, bad)
    pd.DataFrame({"user_id": [1], "seen": [pd.Timestamp("2024-01-01")]}).to_parquet(bad / "users.parquet")
    with pytest.raises(DataError, match=r"users\.parquet.*'seen'"):
        load_dataset_features(store, bad)
    assert store.stats()["users"] == 0  # nothing half-loaded


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="towerann")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_load_then_get(tmp_path, capsys, redis_server: str, redis_prefix: str) -> None:
    _write_dataset(tmp_path / "ds")
    db = tmp_path / "features.sqlite"
    assert _cli(["features", "load", "--data", str(tmp_path / "ds"), "--path", str(db), "--recent", "2"]) == 0
    assert "loaded 4 users" in capsys.readouterr().out
    assert _cli(["features", "get", "--path", str(db), "1"]) == 0
    assert '"13"' in capsys.readouterr().out
    store = open_store("embedded", path=db)
    assert store.get_one("1").recent_items == ("13", "14")
    store.close()

    assert (
        _cli(["features", "load", "--data", str(tmp_path / "ds"), "--store", redis_server, "--prefix", redis_prefix])
        == 0
    )
    assert "loaded 4 users" in capsys.readouterr().out
    assert _cli(["features", "stats", "--store", redis_server, "--prefix", redis_prefix]) == 0
    assert '"users": 4' in capsys.readouterr().out


def test_cli_load_writes_where_serve_reads(tmp_path, capsys) -> None:
    """No --store/--path: the [features] store and path of the config (as `towerann serve` reads them)."""
    from towerann.config import load_config

    _write_dataset(tmp_path / "ds")
    toml = tmp_path / "towerann.toml"
    toml.write_text(f'[features]\nstore = "embedded"\npath = "{tmp_path / "served.sqlite"}"\n')
    assert _cli(["features", "load", "--data", str(tmp_path / "ds"), "--config", str(toml)]) == 0
    capsys.readouterr()
    cfg = load_config(toml).features
    store = open_store(cfg.store, path=cfg.path)
    assert store.stats()["users"] == 4 and store.get_one("1").known
    store.close()

"""`towerann data import`: a user's own CSV / Parquet tables -> the dataset layout (types inferred, columns
mapped by flags, items and users derived when absent), and every bad input refused in one line with counts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.cli import main
from towerann.data import table_import
from towerann.data.dataset import read_interactions, read_items, read_users, validate_dataset
from towerann.data.table_import import NO_CATEGORY, ImportOptions, TableFile, import_tables
from towerann.errors import ConfigError, DataError, TowerannError

ITEMS_CSV = """sku,dept,in_stock,price,brand,is_new
A1,shoes,true,19.5,acme,false
A2,shoes,false,5,acme,true
B7,hats,TRUE,7.25,hatco,false
C3,bags,true,,bagz,false
"""
USERS_CSV = """uid,age,country
u1,31,FR
u2,,DE
u3,47.5,FR
"""
INTERACTIONS_CSV = """uid,sku,ts,qty,note
u1,A1,2024-03-01T10:00:00Z,1,x
u1,B7,2024-03-01 10:00:05,2,
u2,A2,2024-03-02,1,y
u3,C3,2024-03-02T00:00:00+01:00,3,z
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cli(*args: str | Path) -> int:
    return main(["data", "import", *(str(a) for a in args)])


def fails(exc: type[TowerannError], *args: object, **kwargs: object) -> str:
    """import_tables' one-line message for a bad input."""
    with pytest.raises(exc) as e:
        import_tables(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def shop(tmp_path: Path) -> dict[str, Path]:
    return {
        "items": write(tmp_path / "items.csv", ITEMS_CSV),
        "users": write(tmp_path / "users.csv", USERS_CSV),
        "interactions": write(tmp_path / "interactions.csv", INTERACTIONS_CSV),
    }


SHOP_FLAGS = ["--user-id", "uid", "--item-id", "sku", "--timestamp", "ts", "--weight", "qty"]
SHOP_OPTIONS = ImportOptions(user_id="uid", item_id="sku", timestamp="ts", weight="qty")
WITH_ITEMS = replace(SHOP_OPTIONS, category="dept")


# ---- the good path ------------------------------------------------------------------------------


def test_csv_files_import_with_mapped_columns_and_inferred_types(shop, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    files = ["--interactions", shop["interactions"], "--items", shop["items"], "--users", shop["users"]]
    rc = cli(*files, *SHOP_FLAGS, "--category", "dept", "--available", "in_stock", "--out", out)
    assert rc == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith(f"imported {out}: 4 items, 3 users, 4 interactions in ")
    assert "interaction columns not used: interactions.csv: note" in line

    info = validate_dataset(out, verify_checksums=True)  # the layout's own validation
    assert info["manifest"]["source"] == "import"
    assert info["item_numeric"] == ["price", "is_new"]  # a float column and a bool one (as 0/1)
    assert info["item_categorical"] == ["brand"]
    assert info["user_numeric"] == ["age"] and info["user_categorical"] == ["country"]
    assert info["item_id_kind"] == info["user_id_kind"] == "str" and info["has_weight"]

    items = read_items(out)
    assert items.columns.tolist() == ["item_id", "category", "available", "price", "brand", "is_new"]
    assert items["item_id"].tolist() == ["A1", "A2", "B7", "C3"]
    assert items["category"].tolist() == ["shoes", "shoes", "hats", "bags"]
    assert items["available"].tolist() == [True, False, True, True]
    assert items["price"].dtype == np.float32 and np.isnan(items["price"].iloc[3])  # empty -> null
    assert items["is_new"].tolist() == [0.0, 1.0, 0.0, 0.0]
    users = read_users(out)
    assert users["age"].iloc[:1].tolist() == [31.0] and np.isnan(users["age"].iloc[1])

    inter = read_interactions(out)
    assert inter.columns.tolist() == ["user_id", "item_id", "timestamp", "weight"]
    day = pd.Timestamp("2024-03-01T10:00:00Z").timestamp()
    assert inter["timestamp"].tolist() == [day, day + 5, day + 86400 - 36000, day + 86400 - 36000 - 3600]
    assert inter["weight"].tolist() == [1.0, 2.0, 1.0, 3.0]


def test_parquet_files_keep_their_types(tmp_path: Path) -> None:
    items = pa.table(
        {
            "item_id": pa.array([10, 11, 12], pa.int32()),
            "category": pa.array(["a", "b", "a"]).dictionary_encode(),
            "stock": pa.array([3, 0, 1], pa.int64()),  # integers -> numeric
            "score": pa.array([0.5, 1.5, None], pa.float64()),
            "promo": pa.array([True, False, True]),  # bool feature -> 0/1
            "colour": pa.array(["red", None, "blue"], pa.large_string()),
        }
    )
    users = pa.table({"user_id": pa.array([1, 2], pa.int64()), "tier": ["gold", "free"]})
    inter = pa.table(
        {
            "user_id": pa.array([1, 2, 2], pa.int64()),
            "item_id": pa.array([10, 12, 11], pa.int64()),
            "timestamp": pa.array([1_700_000_000_500, 1_700_000_001_000, 1_700_000_002_999], pa.timestamp("ms")),
        }
    )
    for name, table in (("items", items), ("users", users), ("interactions", inter)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    out = import_tables(
        tmp_path / "ds", tmp_path / "interactions.parquet", tmp_path / "items.parquet", tmp_path / "users.parquet"
    ).path
    info = validate_dataset(out)
    assert info["item_numeric"] == ["stock", "score", "promo"] and info["item_categorical"] == ["colour"]
    assert info["user_categorical"] == ["tier"] and info["item_id_kind"] == "int" and not info["has_weight"]
    got = read_items(out)
    assert got["item_id"].dtype == np.int64 and got["available"].all()
    assert got["promo"].tolist() == [1.0, 0.0, 1.0] and got["stock"].dtype == np.float32
    assert read_interactions(out)["timestamp"].tolist() == [1_700_000_000, 1_700_000_001, 1_700_000_002]


def test_one_interactions_file_alone_derives_items_and_users(tmp_path: Path, capsys) -> None:
    """Headerless and tab-separated like MovieLens' u.data: the separator is sniffed, names come from a flag."""
    data = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t878887116\n")
    out = tmp_path / "ds"
    names = ["--interactions-columns", "user_id,item_id,rating,timestamp"]
    assert cli("--interactions", data, *names, "--weight", "rating", "--out", out) == 0
    line = capsys.readouterr().out
    assert "3 interactions" in line and "items and users derived from the interactions" in line
    info = validate_dataset(out)
    assert info["counts"] == {"items": 2, "users": 2, "interactions": 3} and info["item_id_kind"] == "int"
    items = read_items(out)
    assert items["item_id"].tolist() == [242, 302]  # in order of first appearance
    assert (items["category"] == NO_CATEGORY).all() and items["available"].all()
    assert read_users(out)["user_id"].tolist() == [196, 186]
    assert read_interactions(out)["weight"].tolist() == [3.0, 3.0, 1.0]


def test_type_inference_of_text_columns(tmp_path: Path) -> None:
    items = write(
        tmp_path / "items.tsv",
        "item_id\tf\ti\tb\ts\tcodes\tempty\n1\t1.5\t3\tTrue\tx\t007\t\n2\t-2e3\t4\tfalse\ty\tK1A\t\n",
    )
    inter = write(tmp_path / "inter.csv", "user_id,item_id,timestamp\n1,1,10\n1,2,11.9\n")
    res = import_tables(
        tmp_path / "ds", inter, items, options=ImportOptions(categorical=frozenset({"codes"}), drop=frozenset({"s"}))
    )
    info = validate_dataset(res.path)
    assert info["item_numeric"] == ["f", "i", "b"] and info["item_categorical"] == ["codes"]
    got = read_items(res.path)
    assert got["f"].tolist() == [1.5, -2000.0] and got["b"].tolist() == [1.0, 0.0]
    assert got["codes"].tolist() == ["007", "K1A"]  # kept as text, leading zero and all
    assert res.dropped == ["items.tsv: empty"]  # a column empty in every row is left out
    assert read_interactions(res.path)["timestamp"].tolist() == [10, 11]  # seconds, floored


def test_ids_are_text_unless_every_file_has_integer_ids(tmp_path: Path) -> None:
    """'007' is not 7: one file's ids with a leading zero make every file's ids text."""
    items = write(tmp_path / "items.csv", "item_id\n007\n8\n")
    inter = write(tmp_path / "inter.csv", "user_id,item_id,timestamp\n1,8,1\n1,007,2\n")
    out = import_tables(tmp_path / "ds", inter, items).path
    assert validate_dataset(out)["item_id_kind"] == "str" and validate_dataset(out)["user_id_kind"] == "int"
    assert read_interactions(out)["item_id"].tolist() == ["8", "007"]


def test_many_batches_stream_with_the_same_result(tmp_path: Path, monkeypatch) -> None:
    """Small blocks and batches: checks and derivations that span batches (duplicates, unknown items,
    distinct users) behave as on one batch, for CSV and Parquet, int and string ids."""
    monkeypatch.setattr(table_import, "CSV_BLOCK_BYTES", 256)
    monkeypatch.setattr(table_import, "PARQUET_BATCH_ROWS", 7)
    rng = np.random.default_rng(0)
    n = 300
    inter = pd.DataFrame(
        {"user_id": rng.integers(0, 40, n), "item_id": rng.integers(0, 50, n), "timestamp": np.arange(n) + 1000}
    )
    inter.to_csv(tmp_path / "inter.csv", index=False)
    res = import_tables(tmp_path / "a", tmp_path / "inter.csv")
    assert res.counts == {"items": inter["item_id"].nunique(), "users": inter["user_id"].nunique(), "interactions": n}
    assert read_items(res.path)["item_id"].tolist() == list(dict.fromkeys(inter["item_id"]))

    items = pd.DataFrame({"item_id": [f"s{i}" for i in range(50)], "category": ["c"] * 50})
    pq.write_table(pa.Table.from_pandas(items), tmp_path / "items.parquet")
    inter.assign(item_id="s" + inter["item_id"].astype(str)).to_parquet(tmp_path / "inter.parquet")
    assert import_tables(tmp_path / "b", tmp_path / "inter.parquet", tmp_path / "items.parquet").counts["items"] == 50

    last = inter.index[-1]
    inter.loc[last, "item_id"] = 777
    inter.assign(item_id="s" + inter["item_id"].astype(str)).to_parquet(tmp_path / "inter.parquet")
    assert fails(DataError, tmp_path / "c", tmp_path / "inter.parquet", tmp_path / "items.parquet") == (
        "inter.parquet: 1 interactions name items not in items.parquet (e.g. 's777')"
    )
    pd.concat([items, items.iloc[[3]]]).to_csv(tmp_path / "items.csv", index=False)
    assert fails(DataError, tmp_path / "d", tmp_path / "inter.csv", tmp_path / "items.csv") == (
        "items.csv: 1 duplicate item ids (e.g. 's3')"
    )


def test_text_ids_that_share_a_hash_are_still_told_apart(tmp_path: Path, monkeypatch) -> None:
    """Text ids are found by a 64-bit hash, then compared as strings; with a hash that collides all the time
    the duplicates and the unknown items are still exactly the real ones."""
    real = table_import._hash
    monkeypatch.setattr(table_import, "_hash", lambda a: real(a) % np.uint64(3))
    items = write(tmp_path / "items.csv", "item_id\n" + "".join(f"x{i}\n" for i in range(30)))
    rows = "".join(f"1,x{i},{i}\n" for i in (0, 5, 29, 31, 40, 31))
    inter = write(tmp_path / "inter.csv", "user_id,item_id,timestamp\n" + rows)
    assert fails(DataError, tmp_path / "ds", inter, items) == (
        "inter.csv: 3 interactions name items not in items.csv (e.g. 'x31', 'x40')"
    )
    write(items, "item_id\n" + "".join(f"x{i}\n" for i in (*range(30), 7, 12, 7)))
    assert fails(DataError, tmp_path / "ds", inter, items) == "items.csv: 2 duplicate item ids (e.g. 'x7', 'x12')"


# ---- bad input: one line, with counts -----------------------------------------------------------


def test_a_missing_column(shop, tmp_path: Path) -> None:
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], options=ImportOptions(user_id="uid", item_id="sku"))
    assert msg == "interactions.csv: no column 'timestamp' for --timestamp (columns: uid, sku, ts, qty, note)"
    opts = replace(SHOP_OPTIONS, category="department")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], shop["items"], options=opts)
    assert msg == (
        "items.csv: no column 'department' for --category (columns: sku, dept, in_stock, price, brand, is_new)"
    )


def test_duplicate_item_ids(shop, tmp_path: Path) -> None:
    write(shop["items"], ITEMS_CSV + "A2,hats,true,1,x,false\nB7,hats,true,1,x,false\nB7,hats,true,2,x,false\n")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], shop["items"], options=WITH_ITEMS)
    assert msg == "items.csv: 2 duplicate item ids (e.g. 'A2', 'B7')"


def test_duplicate_user_ids(shop, tmp_path: Path) -> None:
    write(shop["users"], USERS_CSV + "u1,20,DE\n")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], users=shop["users"], options=SHOP_OPTIONS)
    assert msg == "users.csv: 1 duplicate user ids (e.g. 'u1')"


def test_interactions_naming_unknown_items(tmp_path: Path) -> None:
    pq.write_table(pa.table({"item_id": np.arange(1, 11, dtype=np.int64)}), tmp_path / "items.parquet")
    rows = [(1, i, 100 + i) for i in (3, 17, 99, 1203, 99, 5)]
    inter = write(
        tmp_path / "interactions.csv", "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    )
    msg = fails(DataError, tmp_path / "ds", inter, tmp_path / "items.parquet")
    assert msg == "interactions.csv: 4 interactions name items not in items.parquet (e.g. 17, 99, 1203)"
    assert not (tmp_path / "ds").exists()  # nothing half-written lands


def test_interactions_naming_unknown_users(shop, tmp_path: Path) -> None:
    write(shop["users"], "uid,age\nu1,3\n")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], users=shop["users"], options=SHOP_OPTIONS)
    assert msg == "interactions.csv: 2 interactions name users not in users.csv (e.g. 'u2', 'u3')"


def test_a_column_that_mixes_numbers_and_text(shop, tmp_path: Path) -> None:
    write(shop["items"], ITEMS_CSV.replace(",19.5,", ",n/a,").replace(",7.25,", ",ask,"))
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], shop["items"], options=WITH_ITEMS)
    assert msg == (
        "items.csv: column 'price' mixes numbers and text (2 of 3 rows are text, e.g. 'n/a'); "
        "fix those rows, --drop price, or --categorical price to keep it as text"
    )
    ok = replace(WITH_ITEMS, categorical=frozenset({"price"}))
    assert validate_dataset(import_tables(tmp_path / "ds", shop["interactions"], shop["items"], options=ok).path)[
        "item_categorical"
    ] == ["price", "brand"]


def test_a_weight_or_timestamp_that_mixes_numbers_and_text(shop, tmp_path: Path) -> None:
    write(shop["interactions"], INTERACTIONS_CSV.replace(",2,\n", ",two,\n"))
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], options=SHOP_OPTIONS)
    assert msg == (
        "interactions.csv: column 'qty' mixes numbers and text (1 of 4 rows are text, e.g. 'two'); "
        "--weight needs numbers"
    )
    write(shop["interactions"], "uid,sku,ts\nu1,A1,1700000000\nu1,A2,yesterday\n")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], options=ImportOptions("uid", "sku", "ts"))
    assert msg == (
        "interactions.csv: column 'ts' mixes numbers and text (1 of 2 rows are text, e.g. 'yesterday'); "
        "timestamps are unix seconds or dates, one or the other"
    )


def test_dates_that_do_not_parse(tmp_path: Path) -> None:
    inter = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,1,2024-01-01\n1,2,soon\n2,1,later\n")
    assert fails(DataError, tmp_path / "ds", inter) == (
        "i.csv: column 'timestamp' (--timestamp) has 2 values that are neither unix seconds nor dates "
        "(e.g. 'soon', 'later')"
    )


def test_milliseconds_are_not_taken_for_seconds(tmp_path: Path) -> None:
    inter = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,1,1700000000000\n1,2,1700000000\n")
    assert fails(DataError, tmp_path / "ds", inter) == (
        "i.csv: column 'timestamp' (--timestamp) has 1 values that look like milliseconds, not unix seconds "
        "(e.g. '1700000000000')"
    )


def test_empty_files(shop, tmp_path: Path) -> None:
    write(shop["users"], "")
    assert fails(DataError, tmp_path / "ds", shop["interactions"], users=shop["users"]) == "users.csv: empty file"
    write(shop["users"], "uid,age\n")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], users=shop["users"], options=SHOP_OPTIONS)
    assert msg == "users.csv: empty file (a header, no rows)"
    pq.write_table(pa.table({"item_id": pa.array([], pa.int64())}), tmp_path / "items.parquet")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], tmp_path / "items.parquet", options=SHOP_OPTIONS)
    assert msg == "items.parquet: empty file (0 rows)"


def test_empty_required_values_and_bad_availability(shop, tmp_path: Path) -> None:
    write(shop["interactions"], "uid,sku,ts\nu1,,1\nu2,A1,2\nu3,,3\n")
    msg = fails(DataError, tmp_path / "ds", shop["interactions"], options=ImportOptions("uid", "sku", "ts"))
    assert msg == (
        "interactions.csv: column 'sku' (--item-id) is empty in 2 of 3 rows (e.g. row 1, row 3); "
        "fill them or leave those rows out"
    )
    write(shop["items"], "sku,live\nA1,yes\nA2,1\n")
    write(shop["interactions"], "uid,sku,ts\nu1,A1,1\n")
    opts = ImportOptions("uid", "sku", "ts", available="live")
    assert fails(DataError, tmp_path / "ds", shop["interactions"], shop["items"], options=opts) == (
        "items.csv: column 'live' (--available) has 1 values that are not true/false/1/0 (e.g. 'yes')"
    )


def test_rows_of_the_wrong_width_and_wrong_encoding(tmp_path: Path) -> None:
    inter = write(tmp_path / "u.data", "1\t2\t3\n4\t5\n")
    msg = fails(DataError, tmp_path / "ds", TableFile(inter, ("user_id", "item_id", "timestamp")))
    assert msg == "u.data: a row has 2 fields where --interactions-columns has 3 (separator '\\t'): '4\\t5'"
    (tmp_path / "latin.csv").write_bytes(b"user_id,item_id,timestamp\n1,caf\xe9,1\n")
    assert fails(DataError, tmp_path / "ds", tmp_path / "latin.csv") == (
        "latin.csv: not utf-8 text; give its encoding with --encoding (e.g. latin-1)"
    )
    res = import_tables(tmp_path / "ds", tmp_path / "latin.csv", options=ImportOptions(encoding="latin-1"))
    assert read_interactions(res.path)["item_id"].tolist() == ["café"]


def test_flag_mistakes_are_config_errors(shop, tmp_path: Path, capsys) -> None:
    opts = ImportOptions("uid", "sku", "ts", category="dept")
    assert fails(ConfigError, tmp_path / "ds", shop["interactions"], options=opts) == (
        "--category dept: names a column of the items file; give --items FILE (without one, the items are the "
        "interactions' item ids, all available, all in category '<none>')"
    )
    opts = ImportOptions("uid", "sku", "ts", drop=frozenset({"colour"}))
    assert fails(ConfigError, tmp_path / "ds", shop["interactions"], options=opts) == (
        "--drop colour: no such column in interactions.csv"
    )
    opts = ImportOptions("uid", "sku", "ts", drop=frozenset({"ts"}))
    assert (
        fails(ConfigError, tmp_path / "ds", shop["interactions"], options=opts)
        == "--drop ts: it is the --timestamp column"
    )
    (tmp_path / "ds").mkdir()
    assert cli("--interactions", shop["interactions"], *SHOP_FLAGS, "--out", tmp_path / "ds") == 2
    err = capsys.readouterr().err
    assert err == f"towerann data: error: {tmp_path / 'ds'} already exists; choose another --out or pass --overwrite\n"
    assert cli("--interactions", shop["interactions"], *SHOP_FLAGS, "--sep", "::", "--out", tmp_path / "x") == 2
    assert "a separator is one character" in capsys.readouterr().err


def test_the_cli_prints_one_line_on_stderr_and_exits_2(shop, tmp_path: Path, capsys) -> None:
    write(shop["items"], ITEMS_CSV + "A1,shoes,true,1,x,false\n")
    files = ["--interactions", shop["interactions"], "--items", shop["items"]]
    rc = cli(*files, *SHOP_FLAGS, "--category", "dept", "--out", tmp_path / "ds")
    assert rc == 2
    assert capsys.readouterr().err == "towerann data: error: items.csv: 1 duplicate item ids (e.g. 'A1')\n"

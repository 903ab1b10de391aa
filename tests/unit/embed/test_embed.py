"""Batch item embedding: parity with the model, the artifact, string ids, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.data.dataset import read_items
from towerann.data.synth import generate
from towerann.data.vectors_dir import read_vectors
from towerann.embed.runner import PROGRESS, embed_catalog, work_dir_for
from towerann.errors import ArtifactError, DataError
from towerann.model.model import TwoTowerModel
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "ds", 2000, 300, seed=0)


@pytest.fixture(scope="module")
def model_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "m"
    train(dataset, out, TowerConfig(dim=32), TrainConfig(epochs=2), progress=False)
    return out


@pytest.fixture(scope="module")
def model(model_dir: Path) -> TwoTowerModel:
    return TwoTowerModel.load(model_dir)


@pytest.fixture(scope="module")
def items(dataset: Path) -> pd.DataFrame:
    return read_items(dataset)


def _with_nulls_and_unknowns(items: pd.DataFrame) -> pd.DataFrame:
    """A catalog with values the model never saw and missing feature values (the cold-start path)."""
    df = items.copy()
    df.loc[0:9, "item_id"] = np.arange(10_000_000, 10_000_010)  # new items: unknown to the id vocabulary
    df.loc[10:19, "category"] = "brand-new-category"
    df["brand"] = df["brand"].astype(object)
    df.loc[20:29, "brand"] = None
    df.loc[30:39, "price"] = np.nan
    return df


def test_vectors_match_the_model(model_dir: Path, model: TwoTowerModel, items: pd.DataFrame, tmp_path: Path) -> None:
    df = _with_nulls_and_unknowns(items)
    file = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), file, row_group_size=700)
    out = embed_catalog(model_dir, file, tmp_path / "vec", batch_size=300, part_size=800, progress=False)
    vs = read_vectors(out)  # checks every checksum
    assert len(vs) == len(df) == 2000
    assert np.allclose(vs.vectors, model.encode_items(df), atol=1e-5)
    assert np.array_equal(vs.ids, np.arange(len(df)))
    assert np.array_equal(vs.external_ids, df["item_id"].to_numpy())
    assert vs.external_ids.dtype == np.int64
    # Filter codes: the model's categories keep the tower's codes; one it never saw gets its own code
    # after them (the tower embeds it as unknown, but a filter on it must still find these items).
    assert vs.category_names == ["<unknown>"] + model.schema.categories.values + ["brand-new-category"]
    assert [vs.category_names[c] for c in vs.categories] == df["category"].astype(str).tolist()
    assert np.array_equal(vs.categories[20:], model.schema.categories.encode(df["category"].to_numpy()[20:]))
    assert np.array_equal(vs.available, df["available"].to_numpy())
    assert np.allclose(np.linalg.norm(vs.vectors, axis=1), 1.0, atol=1e-4)
    assert not work_dir_for(out).exists()


def test_manifest(model_dir: Path, model: TwoTowerModel, dataset: Path, tmp_path: Path) -> None:
    out = embed_catalog(model_dir, dataset, tmp_path / "vec", part_size=768, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "vectors"
    assert (m["count"], m["dim"], m["model_version"], m["metric"]) == (2000, 32, model.version, "ip")
    assert [p["count"] for p in m["parts"]] == [768, 768, 464]
    assert set(m["attrs_sha256"]) == {"external_ids", "categories", "available"}
    vs = read_vectors(out)
    assert (vs.dim, vs.model_version) == (32, model.version)
    # a checksum in the manifest really guards its file
    part = out / m["parts"][1]["vectors"]
    arr = np.load(part)
    arr[0, 0] += 1.0
    np.save(part, arr)
    with pytest.raises(ArtifactError, match="checksum"):
        read_vectors(out)


def test_string_item_ids(model_dir: Path, model: TwoTowerModel, items: pd.DataFrame, tmp_path: Path) -> None:
    df = items.copy()
    df["item_id"] = np.array([f"sku-{i}" for i in df["item_id"]])
    file = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), file)
    vs = read_vectors(embed_catalog(model_dir, file, tmp_path / "vec", batch_size=512, progress=False))
    assert vs.external_ids.dtype.kind == "U"
    assert list(vs.external_ids[:3]) == ["sku-0", "sku-1", "sku-2"]
    assert np.allclose(vs.vectors, model.encode_items(df), atol=1e-5)


def test_resume_skips_finished_parts(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "vec"
    kw = dict(batch_size=256, part_size=500, progress=False)
    work = embed_catalog(model_dir, dataset, out, max_parts=2, **kw)  # "interrupted" after 2 of 4 parts
    assert work == work_dir_for(out) and not out.exists()
    progress = json.loads((work / PROGRESS).read_text())
    assert len(progress["parts"]) == 2
    finished = {p: (work / p).stat().st_mtime_ns for p in ("vectors-00000.npy", "ids-00000.npy", "vectors-00001.npy")}
    assert not (work / "vectors-00002.npy").exists()

    embed_catalog(model_dir, dataset, out, **kw)
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == finished  # not rewritten
    fresh = read_vectors(embed_catalog(model_dir, dataset, tmp_path / "fresh", **kw))
    resumed = read_vectors(out)
    assert np.array_equal(resumed.vectors, fresh.vectors)
    assert np.array_equal(resumed.ids, fresh.ids)
    assert np.array_equal(resumed.external_ids, fresh.external_ids)
    assert np.array_equal(resumed.categories, fresh.categories)


def test_refuses_foreign_or_corrupted_progress(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "vec"
    kw = dict(batch_size=256, part_size=500, progress=False)
    work = embed_catalog(model_dir, dataset, out, max_parts=1, **kw)
    progress_file = work / PROGRESS

    state = json.loads(progress_file.read_text())
    state["model_version"] = "another-model-0123"
    progress_file.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="another model.*--overwrite"):
        embed_catalog(model_dir, dataset, out, **kw)

    progress_file.write_text("{ not json")
    with pytest.raises(ArtifactError, match="progress.*--overwrite"):
        embed_catalog(model_dir, dataset, out, **kw)

    # another part size would cut the catalog differently
    embed_catalog(model_dir, dataset, out, max_parts=1, overwrite=True, **kw)
    with pytest.raises(ArtifactError, match="part size"):
        embed_catalog(model_dir, dataset, out, batch_size=256, part_size=700, progress=False)

    # --overwrite starts over and finishes
    vs = read_vectors(embed_catalog(model_dir, dataset, out, overwrite=True, **kw))
    assert len(vs) == 2000


def test_refuses_other_catalog(model_dir: Path, items: pd.DataFrame, tmp_path: Path) -> None:
    file = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), file)
    out = tmp_path / "vec"
    embed_catalog(model_dir, file, out, part_size=500, max_parts=1, progress=False)
    pq.write_table(pa.Table.from_pandas(items.iloc[:1500], preserve_index=False), file)
    with pytest.raises(ArtifactError, match="another catalog"):
        embed_catalog(model_dir, file, out, part_size=500, progress=False)
    # without resume the stale work is discarded
    assert len(read_vectors(embed_catalog(model_dir, file, out, part_size=500, resume=False, progress=False))) == 1500


def test_existing_output_needs_overwrite(
    model_dir: Path, model: TwoTowerModel, dataset: Path, items: pd.DataFrame, tmp_path: Path
) -> None:
    out = embed_catalog(model_dir, dataset, tmp_path / "vec", part_size=500, progress=False)  # 4 parts
    before = json.loads((out / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="already exists"):
        embed_catalog(model_dir, dataset, out, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == before  # refused: nothing touched
    # Overwritten with another catalog (1,500 rows, new ids): the output is that catalog's, whole,
    # and nothing of the first run is left (its 4 parts, its attributes).
    df = items.iloc[:1500].copy()
    df["item_id"] = df["item_id"] + 1_000_000
    file = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), file)
    embed_catalog(model_dir, file, out, overwrite=True, progress=False)
    after = json.loads((out / "manifest.json").read_text())
    assert (before["count"], after["count"]) == (2000, 1500) and after["model_version"] == model.version
    assert len(before["parts"]) == 4 and len(after["parts"]) == 1
    assert after["attrs_sha256"]["external_ids"] != before["attrs_sha256"]["external_ids"]
    listed = {"manifest.json", *after["attrs_sha256"]} | {p[key] for p in after["parts"] for key in ("vectors", "ids")}
    assert {f.name for f in out.iterdir()} == {n if "." in n else f"{n}.npy" for n in listed}
    vs = read_vectors(out)
    assert np.array_equal(vs.external_ids, df["item_id"].to_numpy())
    assert np.allclose(vs.vectors, model.encode_items(df), atol=1e-5)
    assert vs.model_version == model.version


def test_input_errors(model_dir: Path, items: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="items file not found"):
        embed_catalog(model_dir, tmp_path / "missing.parquet", tmp_path / "vec", progress=False)
    with pytest.raises(DataError, match="items file not found"):
        embed_catalog(model_dir, tmp_path, tmp_path / "vec", progress=False)  # a directory without items.parquet
    file = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pandas(items.drop(columns=["brand"]), preserve_index=False), file)
    with pytest.raises(DataError, match="brand"):
        embed_catalog(model_dir, file, tmp_path / "vec", progress=False)
    file.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="Parquet"):
        embed_catalog(model_dir, file, tmp_path / "vec", progress=False)
    assert not (tmp_path / "vec").exists()


def test_cli(model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from towerann.cli import main

    out = tmp_path / "vec"
    assert (
        main(["embed", "--model", str(model_dir), "--items", str(dataset), "--out", str(out), "--batch-size", "500"])
        == 0
    )
    assert "embedded 2000 items" in capsys.readouterr().out
    assert len(read_vectors(out)) == 2000
    assert (
        main(["embed", "--model", str(model_dir), "--items", str(tmp_path / "nope"), "--out", str(tmp_path / "v2")])
        == 2
    )
    assert "items file not found" in capsys.readouterr().err


def test_cli_keeps_attributes_given_as_columns(
    model_dir: Path, items: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from towerann.cli import main
    from towerann.data.attributes import read_vector_attributes

    df = items.copy()
    df["in_stock"] = np.arange(len(df)) % 4 != 0  # a boolean column
    file = tmp_path / "items.parquet"
    df.to_parquet(file, index=False)
    out = tmp_path / "vec"
    argv = ["embed", "--model", str(model_dir), "--items", str(file), "--out", str(out)]
    assert main([*argv, "--attributes", " brand, in_stock,brand"]) == 0  # spaces and a repeat are fine
    attrs = read_vector_attributes(out)
    assert list(attrs) == ["brand", "in_stock"]
    codes, values = attrs["brand"]
    assert values == sorted(set(df["brand"])) and [values[c] for c in codes] == df["brand"].tolist()
    assert attrs["in_stock"][1] == ["false", "true"]
    assert np.array_equal(attrs["in_stock"][0], df["in_stock"].to_numpy().astype(np.int32))
    assert read_vector_attributes(embed_catalog(model_dir, file, tmp_path / "none", progress=False)) == {}

    capsys.readouterr()
    for attributes, said in [
        ("colour", "no column(s) ['colour'] to keep as filter attributes"),
        ("category", "category is always filterable"),
        ("Brand", "attributes ['Brand']"),
    ]:
        assert main([*argv[:-1], str(tmp_path / attributes), "--attributes", attributes]) == 2, attributes
        err = capsys.readouterr().err
        assert said in err and err.strip().count("\n") == 0, err
        assert not (tmp_path / attributes).exists() and not work_dir_for(tmp_path / attributes).exists()
    with pytest.raises(SystemExit):
        main([*argv, "--attributes", ","])
    assert "column names separated by commas" in capsys.readouterr().err


def test_read_ahead_reader_gives_the_same_batches(model: TwoTowerModel, dataset: Path) -> None:
    """The read-ahead thread (used with a GPU) hands over the same encoded batches as inline reading."""
    import torch

    from towerann.embed.runner import (
        BatchReader,
        filter_categories,
        iter_batches_from,
        open_catalog,
        resolve_items_file,
    )

    file = resolve_items_file(dataset)
    cols = model.schema.item_columns()
    runs = []
    for ahead in (False, True):
        pf = open_catalog(file, cols)
        reader = BatchReader(
            iter_batches_from(pf, file, cols, 700, 256), model, filter_categories(pf, model), torch.device("cpu"), ahead
        )
        reader.start()
        runs.append(list(reader))
        reader.close()
    inline, threaded = runs
    assert [e.start for e in threaded] == [e.start for e in inline] and inline[0].start == 700
    assert sum(len(e.available) for e in threaded) == 1300
    for a, b in zip(inline, threaded):
        assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))

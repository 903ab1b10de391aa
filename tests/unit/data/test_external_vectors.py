"""Bring your own vectors: `towerann index build --vectors FILE` (Parquet, or .npy + ids) gives the same
answers as exact search done by hand on those vectors; bad files get one clear error."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.data.external_vectors import import_vectors
from towerann.data.vectors_dir import read_vectors
from towerann.errors import ConfigError, DataError
from towerann.index import load
from towerann.index.base import Filter
from towerann.index.commands import add_commands

N, D = 800, 24


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="towerann")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def catalog(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "ids": rng.choice(10**12, N, replace=False).astype(np.int64),
        "vectors": rng.standard_normal((N, D)).astype(np.float32) * rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32),
        "category": rng.choice(["shoes", "hats", "bags"], N),
        "available": rng.random(N) > 0.1,
    }


def write_parquet(path, c: dict[str, np.ndarray], fixed: bool = True) -> None:
    flat = pa.array(c["vectors"].ravel())
    vec = pa.FixedSizeListArray.from_arrays(flat, D) if fixed else pa.array([list(v) for v in c["vectors"]])
    pq.write_table(pa.table({"sku": c["ids"], "emb": vec, "cat": c["category"], "in_stock": c["available"]}), path)


def by_hand(c: dict[str, np.ndarray], q: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    scores = q @ c["vectors"].T
    scores[:, ~allowed] = -np.inf
    return c["ids"][np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def test_a_parquet_of_vectors_made_elsewhere_builds_an_index_with_exact_answers(tmp_path) -> None:
    rng = np.random.default_rng(3)
    c = catalog(rng)
    write_parquet(tmp_path / "items.parquet", c)
    root = tmp_path / "indexes"
    assert (
        run(
            [
                "index",
                "build",
                "--vectors",
                str(tmp_path / "items.parquet"),
                "--kind",
                "exact",
                "--out",
                str(root),
                "--id-column",
                "sku",
                "--vector-column",
                "emb",
                "--category-column",
                "cat",
                "--available-column",
                "in_stock",
            ]
        )
        == 0
    )
    vs = read_vectors(tmp_path / "indexes-vectors")
    assert vs.model_version.startswith("external-") and vs.dim == D
    assert np.array_equal(vs.external_ids, c["ids"]) and np.allclose(vs.vectors, c["vectors"])  # taken as they are
    ix = load(root, expected_model_version=vs.model_version, expected_dim=D)
    q = rng.standard_normal((10, D)).astype(np.float32)
    got = vs.external_ids[ix.search(q, 20).ids]
    assert np.array_equal(got, by_hand(c, q, 20, c["available"]))
    hats = vs.category_names.index("hats")
    got = vs.external_ids[ix.search(q, 20, Filter(categories=frozenset({hats}))).ids]
    assert np.array_equal(got, by_hand(c, q, 20, c["available"] & (c["category"] == "hats")))


def test_npy_vectors_with_ids_and_normalisation(tmp_path) -> None:
    rng = np.random.default_rng(4)
    c = catalog(rng)
    np.save(tmp_path / "v.npy", c["vectors"])
    np.save(tmp_path / "ids.npy", c["ids"])
    out = import_vectors(tmp_path / "v.npy", tmp_path / "vec", ids=tmp_path / "ids.npy", normalize=True)
    vs = read_vectors(out)
    assert np.allclose(np.linalg.norm(vs.vectors, axis=1), 1.0, atol=1e-5) and vs.available.all()
    unit = c["vectors"] / np.linalg.norm(c["vectors"], axis=1, keepdims=True)
    assert np.allclose(vs.vectors, unit, atol=1e-6) and np.array_equal(vs.external_ids, c["ids"])


@pytest.mark.parametrize(
    "breaks, message",
    [
        ("nan", "NaN or infinite"),
        ("ragged", "different lengths"),
        ("duplicate", "not unique"),
        ("column", "no column"),
    ],
)
def test_a_bad_vectors_file_is_one_clear_error(tmp_path, breaks: str, message: str) -> None:
    c = catalog(np.random.default_rng(5))
    if breaks == "nan":
        c["vectors"][7, 3] = np.nan
    if breaks == "duplicate":
        c["ids"][9] = c["ids"][8]
    file = tmp_path / "items.parquet"
    if breaks == "ragged":
        rows = [list(v) for v in c["vectors"]]
        rows[5] = rows[5][:-1]
        pq.write_table(pa.table({"sku": c["ids"], "emb": pa.array(rows)}), file)
    else:
        write_parquet(file, c, fixed=False)
    vector_column = "embedding" if breaks == "column" else "emb"
    with pytest.raises(DataError, match=message) as e:
        import_vectors(file, tmp_path / "vec", id_column="sku", vector_column=vector_column)
    assert "\n" not in str(e.value) and str(file) in str(e.value)
    assert not (tmp_path / "vec").exists()  # nothing half-written


def test_file_options_on_a_vectors_directory_are_refused(tmp_path) -> None:
    c = catalog(np.random.default_rng(6))
    np.save(tmp_path / "v.npy", c["vectors"])
    np.save(tmp_path / "ids.npy", c["ids"])
    vec = import_vectors(tmp_path / "v.npy", tmp_path / "vec", ids=tmp_path / "ids.npy")
    with pytest.raises(ConfigError, match="apply to a vectors file"):
        run(["index", "build", "--vectors", str(vec), "--kind", "exact", "--out", str(tmp_path / "ix"), "--normalize"])
    with pytest.raises(DataError, match="needs --ids"):
        import_vectors(tmp_path / "v.npy", tmp_path / "vec2")

"""`towerann index build | rollback | info` on a real vectors directory (parser built from add_commands)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from towerann.data.vectors_dir import write_vectors
from towerann.errors import ConfigError, TowerannError
from towerann.index import load
from towerann.index.commands import add_commands
from towerann.index.snapshot import current_version, list_versions

D, N = 16, 600


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="towerann")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def vectors_dir(tmp_path):
    rng = np.random.default_rng(5)
    v = rng.standard_normal((N, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return write_vectors(
        tmp_path / "vectors",
        v,
        np.arange(N, dtype=np.int64),
        (np.arange(N) % 3).astype(np.int32),
        np.arange(N) % 10 != 0,
        ["a", "b", "c"],
        "tower-7",
        np.arange(N) + 5000,
    )


def test_build_publish_info_rollback(vectors_dir, tmp_path, capsys):
    root = tmp_path / "indexes"
    q = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
    np.save(tmp_path / "users.npy", q / np.linalg.norm(q, axis=1, keepdims=True))
    assert (
        run(
            [
                "index",
                "build",
                "--vectors",
                str(vectors_dir),
                "--kind",
                "hnsw",
                "--out",
                str(root),
                "--param",
                "M=8",
                "--param",
                "ef=64",
                "--param",
                "exact_below=0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "HNSW8,Flat" in out and "peak memory" in out and "snapshot:" in out
    first = current_version(root)
    ix = load(root, expected_model_version="tower-7", expected_dim=D)
    assert ix.kind == "hnsw" and len(ix) == N and ix.search_defaults["ef"] == 64
    assert ix.search_defaults["exact_below"] == 0  # masked searches go through HNSW, not brute force
    assert ix.manifest["category_names"] == ["a", "b", "c"]
    found = ix.search(q, 50).ids
    assert not np.isin(found, np.arange(0, N, 10)).any()  # unavailable items stay out of the graph walk
    truth = ix.exact_search(q, 50).ids
    assert np.mean([len(np.intersect1d(f, t)) / 50 for f, t in zip(found, truth)]) >= 0.95

    assert (
        run(
            [
                "index",
                "build",
                "--vectors",
                str(vectors_dir),
                "--kind",
                "auto",
                "--out",
                str(root),
                "--recall",
                "0.9",
                "--k",
                "20",
                "--queries",
                str(tmp_path / "users.npy"),
            ]
        )
        == 0
    )
    assert "tuned:" in capsys.readouterr().out
    assert load(root).kind == "exact" and len(list_versions(root)) == 2

    assert run(["index", "info", str(root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "exact" and info["count"] == N and info["checksums"] == "ok"
    assert info["model_version"] == "tower-7" and len(info["versions"]) == 2

    assert run(["index", "rollback", "--root", str(root)]) == 0
    assert current_version(root) == first and first in capsys.readouterr().out


def test_build_errors_are_towerann_errors(vectors_dir, tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        run(
            [
                "index",
                "build",
                "--vectors",
                str(vectors_dir),
                "--kind",
                "hnsw",
                "--out",
                str(tmp_path / "i"),
                "--param",
                "M",
            ]
        )
    with pytest.raises(ConfigError, match="--queries"):
        run(
            [
                "index",
                "build",
                "--vectors",
                str(vectors_dir),
                "--kind",
                "hnsw",
                "--out",
                str(tmp_path / "i"),
                "--recall",
                "0.9",
            ]
        )
    with pytest.raises(ConfigError, match="bad build parameters"):
        run(
            [
                "index",
                "build",
                "--vectors",
                str(vectors_dir),
                "--kind",
                "hnsw",
                "--out",
                str(tmp_path / "i"),
                "--param",
                "bogus=1",
            ]
        )
    with pytest.raises(TowerannError, match="manifest.json"):
        run(["index", "build", "--vectors", str(tmp_path), "--kind", "exact", "--out", str(tmp_path / "i")])
    assert not (tmp_path / "i").exists()


def test_tuning_queries_come_from_a_file(vectors_dir, tmp_path, capsys):
    """index/ loads no model: --data/--model are refused in one line naming the command that writes the
    queries, and so is --recall without --queries."""
    root = str(tmp_path / "indexes")
    assert run(["index", "build", "--vectors", str(vectors_dir), "--kind", "exact", "--out", root]) == 0
    build = ["build", "--vectors", str(vectors_dir), "--kind", "hnsw", "--out", root]
    for action in (build, ["tune", root]):
        for moved in (["--data", "d"], ["--model", "m"]):
            with pytest.raises(ConfigError, match=r"^--data and --model moved out of `index`: .*model queries"):
                run(["index", *action, "--recall", "0.9", "--queries", "q.npy", *moved])
        with pytest.raises(ConfigError) as e:
            run(["index", *action, "--recall", "0.9"])
        assert str(e.value) == (
            "--recall needs user-tower queries: --queries FILE "
            "(make one with `towerann model queries --data DIR --model DIR --out q.npy`)"
        )


def test_info_reports_the_compressed_index_memory(vectors_dir, tmp_path, capsys):
    root = tmp_path / "indexes"
    assert run(["index", "build", "--vectors", str(vectors_dir), "--kind", "ivfpq", "--out", str(root)]) == 0
    capsys.readouterr()
    assert run(["index", "info", str(root)]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["disk_bytes_per_item"] == D * 4  # the full vectors stay in the file
    assert memory["mapped_tables_bytes_per_item"] == 8 + 16  # so do the slot -> id table and the id lookup
    assert 0 < memory["resident_bytes_per_item"] < D * 4  # slot tables (too few items for codes here)
    by_table = memory["resident_bytes_per_item_by_table"]
    assert by_table["ids"] == by_table["lookup"] == 0 and by_table["flags"] == 0.25, by_table

"""`towerann index build --param partition_by=category`: the snapshot holds the partitions and
`index info` lists them; a bad partition_min is a one-line ConfigError."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_index_cli import run  # the parser built from add_commands

from towerann.data.vectors_dir import write_vectors
from towerann.errors import ConfigError
from towerann.index import Filter, load

D, N = 16, 900


@pytest.fixture
def vectors_dir(tmp_path):
    rng = np.random.default_rng(5)
    v = rng.standard_normal((N, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cats = np.where(np.arange(N) < 60, 2, np.arange(N) % 2).astype(np.int32)  # category 2: 60 items, no partition
    return write_vectors(
        tmp_path / "vectors",
        v,
        np.arange(N, dtype=np.int64),
        cats,
        np.arange(N) % 10 != 0,
        ["a", "b", "c"],
        "tower-7",
        np.arange(N) + 5000,
    )


def test_build_with_partitions_and_info_lists_them(vectors_dir, tmp_path, capsys):
    root = tmp_path / "indexes"
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
                "partition_by=category",
                "--param",
                "partition_min=200",
            ]
        )
        == 0
    )
    assert "partitions=category>=200" in capsys.readouterr().out
    assert run(["index", "info", str(root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["partitions"] == {"by": "category", "min_items": 200, "values": {"0": 420, "1": 420}}
    ix = load(root)
    res = ix.search(
        np.ones(D, np.float32),
        30,
        filter=Filter(categories=frozenset({1})),
        params={"filter_path": "partition", "exact_below": 0},
    )
    assert res.exact_rows == 0 and (res.ids % 2 == 1).all() and not (res.ids % 10 == 0).any()
    with pytest.raises(ConfigError, match="partition_min"):
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
                "partition_by=category",
                "--param",
                "partition_min=0",
            ]
        )

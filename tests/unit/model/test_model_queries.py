"""`towerann model queries`: the user-tower vectors of a dataset's held-out users, written as the .npy that
`index build --queries` tunes on; each one is what serving's encoder makes of that user at that moment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.artifacts import load_npy
from towerann.cli import main
from towerann.data.synth import generate
from towerann.model.export import UserEncoder
from towerann.model.model import TwoTowerModel
from towerann.model.prepare import TEST, prepare
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, train

TOWER = TowerConfig(dim=16, id_dim=8, category_dim=4, attr_dim=4, hidden=32, history_len=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # >= 10 interactions per user: every user has held-out (test) interactions
    return generate(
        tmp_path_factory.mktemp("q") / "ds", n_items=300, n_users=60, seed=4, interactions_per_user=(10, 20)
    )


@pytest.fixture(scope="module")
def model_dir(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q") / "m"
    train(data, out, TOWER, TrainConfig(epochs=1, batch_size=256), progress=False)
    return out


def _by_hand(model_dir: Path, data: Path) -> np.ndarray:
    """Each held-out user's vector as serving makes it: one request (user id, static features, the items
    before the held-out period, newest first) through the encoder, in torch."""
    model = TwoTowerModel.load(model_dir)
    enc = UserEncoder(model, runtime="torch")
    p = prepare(data, TOWER.history_len)
    test = np.flatnonzero(p.split == TEST)
    first = test[np.r_[True, p.user_key[test][1:] != p.user_key[test][:-1]]]  # a user's first held-out row
    codes = model.schema.categories.encode(p.items["category"].to_numpy())
    ids = p.items["item_id"].astype(str).to_numpy()
    static_cols = [c.name for c in model.schema.user_numeric + model.schema.user_categorical]
    out = []
    for r in first:
        static = p.users.iloc[p.user_row[r]][static_cols].to_dict() if p.user_row[r] >= 0 else {}
        hist = [(ids[h], int(codes[h])) for h in p.hist_rows[r] if h >= 0]
        out.append(enc.encode(str(p.user_key[r]), static, hist))
    return np.stack(out)


def test_queries_are_the_user_towers_vectors_of_the_held_out_users(
    data: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.npy"
    assert main(["model", "queries", "--data", str(data), "--model", str(model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and str(out) in printed
    q = load_npy(out)
    want = _by_hand(model_dir, data)
    assert q.dtype == np.float32 and q.shape == (60, TOWER.dim) == want.shape  # every user has held-out clicks
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(q, want, atol=1e-5)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "q.npy"]  # no temporary file left beside it

    # --n: a seeded sample of those users
    few = tmp_path / "few.npy"
    argv = ["model", "queries", "--data", str(data), "--model", str(model_dir), "--out", str(few), "--n", "7"]
    assert main(argv) == 0
    sample = load_npy(few)
    assert sample.shape == (7, TOWER.dim)
    assert all(np.abs(want - row).max(axis=1).min() < 1e-5 for row in sample)


def test_index_build_tunes_on_the_written_queries(data: Path, model_dir: Path, tmp_path: Path) -> None:
    from towerann.embed.runner import embed_catalog
    from towerann.index.snapshot import read_checked_manifest, resolve

    vectors = tmp_path / "vectors"
    embed_catalog(model_dir, data, vectors, progress=False)
    q = tmp_path / "q.npy"
    base = ["model", "queries", "--data", str(data), "--model", str(model_dir), "--out", str(q)]
    assert main([*base, "--vectors", str(vectors)]) == 0
    root = tmp_path / "index"
    argv = ["index", "build", "--vectors", str(vectors), "--kind", "hnsw", "--out", str(root), "--queries", str(q)]
    assert main([*argv, "--recall", "0.9", "--k", "10"]) == 0
    tuning = read_checked_manifest(resolve(root), verify=False)["tuning"]
    assert tuning["queries"] == 60 and tuning["k"] == 10


def test_bad_requests_are_refused_in_one_line(
    data: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.npy"
    base = ["model", "queries", "--data", str(data), "--model", str(model_dir), "--out", str(out)]
    assert main([*base, "--n", "0"]) == 2
    # vectors embedded by another model: queries of this one would tune that index on the wrong space
    other = tmp_path / "other"
    train(data, other, TOWER, TrainConfig(epochs=1, batch_size=256, seed=1), progress=False)
    from towerann.embed.runner import embed_catalog

    embed_catalog(other, data, tmp_path / "vectors", progress=False)
    capsys.readouterr()
    assert main([*base, "--vectors", str(tmp_path / "vectors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embedded" in err
    assert not out.exists()

"""`eval --session`: the value of real-time clicks, measured offline, deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.data.synth import generate
from towerann.model.session_eval import evaluate_session
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("session")
    data = generate(base / "data", 1500, 400, seed=3)
    model = base / "model"
    train(data, model, TowerConfig(dim=16), TrainConfig(epochs=3, seed=0), progress=False)
    return data, model


def test_session_eval_is_deterministic_and_clicks_move_the_candidates(trained: tuple[Path, Path]) -> None:
    data, model = trained
    first = evaluate_session(data, model, max_users=150, shift_users=40, seed=1)
    assert evaluate_session(data, model, max_users=150, shift_users=40, seed=1) == first
    assert evaluate_session(data, model, max_users=150, shift_users=40, seed=2) != first  # the seed samples users

    ni = first["next_item"]
    assert ni["users"] == 150 and ni["next_items"] > ni["later_items"] > 0
    # On each user's first held-out item both queries are the same one; they differ only later on.
    assert ni["with_session"]["later_items"] != ni["without_session"]["later_items"]  # the frozen query differs
    n, later = ni["next_items"], ni["later_items"]
    for k in ("recall@10", "recall@100"):
        firsts = {
            name: ni[name][k] * n - ni[name]["later_items"][k] * later for name in ("with_session", "without_session")
        }
        assert firsts["with_session"] == pytest.approx(firsts["without_session"], abs=0.01 * n + 1), (k, firsts)
        assert 0 <= ni["with_session"][k] <= 1 and ni["with_session"]["recall@10"] <= ni["with_session"]["recall@100"]

    shift = first["interest_shift"]
    share = np.asarray(shift["share_by_clicks"])
    assert shift["users"] == 40 and len(share) == 11
    assert share[0] < 0.05  # the category each user was shown least of
    assert share[10] > share[5] > share[0] + 0.03, share  # clicks in it move the top 100 toward it
    if shift["clicks_to_50pct"] is not None:
        assert shift["clicks_to_20pct"] <= shift["clicks_to_50pct"]
        assert share[shift["clicks_to_50pct"]] > 0.5 >= share[shift["clicks_to_50pct"] - 1]


def test_eval_session_on_the_command_line_writes_what_the_python_api_returns(trained, tmp_path: Path, capsys) -> None:
    import json

    from towerann.cli import main

    data, model = trained
    out = tmp_path / "session.json"
    assert (
        main(
            [
                "eval",
                "--session",
                "--data",
                str(data),
                "--model",
                str(model),
                "--users",
                "100",
                "--seed",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(evaluate_session(data, model, max_users=100, seed=4)))
    assert "with session recall@10" in capsys.readouterr().out

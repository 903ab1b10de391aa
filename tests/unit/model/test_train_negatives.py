"""Training's negatives and the weights it keeps: mixed negatives (in-batch + uniform catalog draws) with the
logQ correction of their mixture and accidental hits masked; weights averaged from the validation plateau on;
the search's time cap per trial."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from towerann.data.synth import generate
from towerann.model import hparam_search
from towerann.model.evaluate import held_out, two_tower_topk
from towerann.model.hparam_search import SearchConfig, search
from towerann.model.prepare import TEST, TRAIN, prepare
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, _Average, corrected_logits, fit

TOWER = TowerConfig(dim=16, id_dim=8, category_dim=4, attr_dim=4, hidden=32, history_len=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_logits_are_corrected_by_the_mixture_and_accidental_hits_masked() -> None:
    items = torch.tensor([3, 1, 3])  # rows 0 and 2 clicked the same item
    cand = torch.cat([items, torch.tensor([1, 0])])  # two uniform draws: item 1 (row 1's positive) and item 0
    share = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)  # item 0 has no training clicks
    scores = torch.arange(15, dtype=torch.float32).reshape(3, 5) / 10
    logits = corrected_logits(scores, items, cand, share, uniform_share=0.5, temperature=0.1, logq_weight=1.0)
    expected_count = 3 * share[cand] + 0.5
    want = scores / 0.1 - torch.log(expected_count).float()
    masked = {(0, 2), (2, 0), (1, 3)}  # the same item elsewhere among the candidates; never a row's own column
    for i in range(3):
        for j in range(5):
            if (i, j) in masked:
                assert logits[i, j] == -math.inf
            else:
                assert logits[i, j] == pytest.approx(float(want[i, j]), rel=1e-5)
    # in-batch only: the correction is log(share) up to a constant per row, which softmax ignores
    inb = corrected_logits(scores[:, :3], items, items, share, 0.0, 0.1, 1.0)
    old = scores[:, :3] / 0.1 - torch.log(share[items]).float()
    finite = torch.isfinite(inb)
    assert torch.allclose(
        torch.log_softmax(inb, 1)[finite], torch.log_softmax(old.masked_fill(~finite, -math.inf), 1)[finite]
    )


def test_average_starts_on_the_plateau_as_a_mean_then_a_moving_average_and_swaps_back() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    avg = _Average([w], steps=2)

    def step(value: float) -> None:
        with torch.no_grad():
            w.fill_(value)
        avg.update()

    step(7.0)
    avg.swap()
    assert avg.values is None and torch.equal(w.detach(), torch.full((2,), 7.0))  # not started: nothing averaged
    avg.start()
    for value in (1.0, 3.0, 5.0):
        step(value)
    # the mean of the first two steps after the start (1, 3), then halfway towards 5
    assert avg.values is not None and torch.equal(avg.values[0], torch.full((2,), 3.5))
    avg.swap()
    assert torch.equal(w.detach(), torch.full((2,), 3.5))
    avg.swap()
    assert torch.equal(w.detach(), torch.full((2,), 5.0))
    off = _Average([w], steps=0)
    off.start()
    off.update()
    off.swap()
    assert off.values is None and torch.equal(w.detach(), torch.full((2,), 5.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("neg") / "ds", n_items=1500, n_users=200, seed=5, interactions_per_user=(15, 40)
    )


def _unclicked_share_of_top(data: Path, uniform_negatives: int) -> float:
    """How much of the test users' top 100 are items without a training click."""
    p = prepare(data, TOWER.history_len)
    cfg = TrainConfig(epochs=3, patience=3, batch_size=256, uniform_negatives=uniform_negatives)
    model = fit(p, str(data), TOWER, cfg, progress=False)
    top = two_tower_topk(model, p, held_out(p, TEST), 100)
    clicked = np.bincount(p.item_row[p.split == TRAIN], minlength=len(p.items)) > 0
    assert (~clicked).mean() > 0.2  # the catalog has many such items
    return float((~clicked[top]).mean())


def test_uniform_negatives_push_items_never_clicked_down_the_ranking(data: Path) -> None:
    in_batch, mixed = _unclicked_share_of_top(data, 0), _unclicked_share_of_top(data, 256)
    assert mixed < 0.5 * in_batch, (in_batch, mixed)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_a_trial_is_cut_at_what_is_left_of_the_search_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, given = _Clock(), []

    def fake_fit(p: Any, data: str, tower: TowerConfig, cfg: TrainConfig, progress: bool | None = None) -> Any:
        given.append(cfg.max_seconds)
        clock.now += 10.0
        return SimpleNamespace(info={"val_recall@100": 0.1 * len(given), "best_epoch": 1})

    monkeypatch.setattr(hparam_search, "time", clock)
    monkeypatch.setattr(hparam_search, "fit", fake_fit)
    found = search(
        "ds", TOWER, TrainConfig(), SearchConfig(budget_s=25.0, max_trials=10), prepared=object(), progress=False
    )  # type: ignore[arg-type]
    # trial 1 runs in full (10 s); trial 2 starts (10 + 10 <= 25) with the 15 s left; then 20 + 10 > 25
    assert given == [None, 15.0] and found.info["search"]["stopped_by"] == "budget_s (25 s)"
    given.clear()
    clock.now = 0.0
    search("ds", TOWER, TrainConfig(max_seconds=12.0), SearchConfig(25.0, 10), prepared=object(), progress=False)  # type: ignore[arg-type]
    assert given == [12.0, 12.0]  # a trial's own, smaller budget is kept


def test_training_validates_the_average_from_its_first_epoch_without_gain(data: Path) -> None:
    p = prepare(data, TOWER.history_len)
    cfg = TrainConfig(epochs=10, patience=10, batch_size=256, lr=3e-2)
    epochs = fit(p, str(data), TOWER, cfg, progress=False).info["epochs"]
    scores = [e["val_recall@100"] for e in epochs]
    plateau = next(i for i in range(1, len(scores)) if scores[i] <= max(scores[:i]))  # 0-based: the first without gain
    assert [bool(e.get("averaged")) for e in epochs] == [i > plateau for i in range(len(epochs))]
    off = fit(p, str(data), TOWER, dataclasses.replace(cfg, average_epochs=0), progress=False)
    assert not any(e.get("averaged") for e in off.info["epochs"])

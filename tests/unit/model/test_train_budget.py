"""`TrainConfig.max_seconds`: training keeps its time budget by what it does, not by how fast this machine is.

A fake clock stands in for train.clock: a training step costs STEP seconds and a validation VALIDATION
seconds of it, nothing else does. Then which steps run follows from the budget alone: an epoch is cut
short before the step that (with the validation after it) would end past the budget, the cut epoch is
validated, and an epoch with no time for a step does not start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from towerann.data.synth import generate
from towerann.model import train as train_module
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, train

STEP = 1.0
VALIDATION = 5.0
TOWER = TowerConfig(dim=8, hidden=16, history_len=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "ds", 300, 120, seed=1, interactions_per_user=(10, 20))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []  # "step" / "validation", in the order they ran

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    real_topk = train_module.two_tower_topk

    def step_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        fake.now += STEP
        fake.log.append("step")
        return F.cross_entropy(*args, **kwargs)

    def validation(*args: Any, **kwargs: Any) -> Any:
        fake.now += VALIDATION
        fake.log.append("validation")
        return real_topk(*args, **kwargs)

    monkeypatch.setattr(train_module, "clock", fake)
    monkeypatch.setattr(train_module, "F", SimpleNamespace(cross_entropy=step_loss))
    monkeypatch.setattr(train_module, "two_tower_topk", validation)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield fake
    torch.set_num_threads(threads)


def fit(data: Path, max_seconds: float | None, epochs: int = 3) -> dict[str, Any]:
    cfg = TrainConfig(epochs=epochs, batch_size=64, patience=epochs, max_seconds=max_seconds)
    return train(data, None, TOWER, cfg, progress=False).info


def steps_of(info: dict[str, Any]) -> list[int]:
    return [e["steps"] for e in info["epochs"]]


def test_without_a_budget_every_epoch_runs_whole(data: Path, clock: FakeClock) -> None:
    info = fit(data, None)
    n = steps_of(info)[0]
    assert n >= 5 and steps_of(info) == [n, n, n]
    assert clock.log == (["step"] * n + ["validation"]) * 3
    assert not any(e.get("cut_by_time_budget") for e in info["epochs"])


def test_an_epoch_that_would_overrun_is_cut_before_the_step_that_would_and_then_validated(
    data: Path, clock: FakeClock
) -> None:
    n = steps_of(fit(data, None))[0]
    clock.now, clock.log = 0.0, []
    # epoch 1 ends at n + VALIDATION; then each step needs STEP + VALIDATION of the budget left
    budget = n + VALIDATION + 3 * STEP + VALIDATION
    info = fit(data, budget)
    assert steps_of(info) == [n, 3]
    assert clock.log == ["step"] * n + ["validation"] + ["step"] * 3 + ["validation"]
    assert info["epochs"][1]["cut_by_time_budget"] is True and "cut_by_time_budget" not in info["epochs"][0]
    assert clock.now == budget and info["train_seconds"] <= budget
    assert info["best_epoch"] in (1, 2)  # the cut epoch competes for best like any other


def test_no_epoch_starts_without_time_for_a_step_and_its_validation(data: Path, clock: FakeClock) -> None:
    n = steps_of(fit(data, None))[0]
    clock.now, clock.log = 0.0, []
    budget = n + VALIDATION + STEP + VALIDATION - 0.5  # half a step short of one more step and validation
    info = fit(data, budget)
    assert steps_of(info) == [n] and clock.log == ["step"] * n + ["validation"]
    assert clock.now <= budget


def test_a_budget_spent_early_still_trains_one_step_then_validates(data: Path, clock: FakeClock) -> None:
    info = fit(data, 0.1)
    assert steps_of(info) == [1] and clock.log == ["step", "validation"]
    assert info["epochs"][0]["cut_by_time_budget"] is True and info["best_epoch"] == 1


@pytest.mark.parametrize("budget_steps", [7, 20, 33])
def test_the_budget_is_kept_once_a_validation_was_timed(data: Path, clock: FakeClock, budget_steps: int) -> None:
    """Past the first validation (whose length is not known before it runs) the run ends within the budget."""
    n = steps_of(fit(data, None, epochs=1))[0]
    clock.now, clock.log = 0.0, []
    budget = n + VALIDATION + budget_steps * STEP
    info = fit(data, budget, epochs=30)
    assert clock.now <= budget, (clock.now, budget)
    assert budget - clock.now < STEP + VALIDATION  # and stops no earlier than it must
    assert sum(steps_of(info)) == clock.log.count("step")

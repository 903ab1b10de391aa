"""Choosing training settings on the validation split: a small greedy search (ALS's grid is evaluate.tune_als).

Fixed constants fit the data they were tuned on (ml-100k) and not data in general, so `towerann
train --search` tries a handful of settings and keeps the one with the best validation recall@K.
The search is coordinate-wise and greedy: it starts from the given settings, then changes one
knob at a time (weight decay, temperature, learning rate, logQ weight, output dim, id-embedding size) from the
best settings so far, in a fixed order, so a seed gives the same trials and the same choice.
Epochs are chosen inside each trial by early stopping on the same validation recall.

Every trial trains on TRAIN and is scored on VALID only (`fit` never reads the test split), so the
test split stays an honest estimate. The budget is a count of trials and a time limit: no new
trial starts once the next one (estimated from the mean so far) would end past the limit, and a
trial that runs longer than the mean is cut at the limit (train's max_seconds: its best epoch so
far is kept and scored like any other); the manifest records which bound stopped the search.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towerann.errors import ConfigError
from towerann.model.evaluate import MIN_GAIN
from towerann.model.model import TwoTowerModel
from towerann.model.prepare import Prepared, prepare
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig, fit

log = logging.getLogger(__name__)

# (knob, alternatives tried around the best value so far), in search order: the knobs that moved
# validation recall most on ml-100k and the synthetic regimes come first, so a short budget still
# reaches them. Tower knobs live in TowerConfig, the rest in TrainConfig.
STAGES: tuple[tuple[str, tuple[float, ...]], ...] = (
    # Adam's L2 penalty, on the embeddings as much as on the layers: with few clicks per item (dense users:
    # 500 users for 5000 items) the unregularised towers peak by epoch 5 and fall; 1e-2 lifted validation
    # recall@100 by 0.02-0.03 there and on short-tail, and lost on ml-100k (1e-6, the value tried here
    # before, is too weak to matter: within +-0.007 of none on every regime)
    ("weight_decay", (1e-2,)),
    ("temperature", (0.05, 0.2)),
    ("lr", (1e-3,)),
    ("logq_weight", (1.5, 2.0)),  # below 1 lost on every regime measured (bench model)
    ("dim", (64,)),
    ("id_dim", (64, 16)),
)
TOWER_KNOBS = frozenset(f.name for f in dataclasses.fields(TowerConfig))


@dataclass
class SearchConfig:
    budget_s: float = 300.0  # wall-clock limit: no trial starts that would (by the mean so far) end past it
    max_trials: int = 10  # including the first (the given settings)


def _settings(tower: TowerConfig, cfg: TrainConfig) -> dict[str, Any]:
    knobs = {name for name, _ in STAGES}
    return {k: v for k, v in (tower.to_json() | cfg.__dict__).items() if k in knobs}


def _with(tower: TowerConfig, cfg: TrainConfig, knob: str, value: float) -> tuple[TowerConfig, TrainConfig]:
    if knob in TOWER_KNOBS:
        tower_change: dict[str, Any] = {knob: int(value)}
        return dataclasses.replace(tower, **tower_change), cfg
    train_change: dict[str, Any] = {knob: float(value)}
    return tower, dataclasses.replace(cfg, **train_change)


def search(
    data: str | Path,
    tower: TowerConfig | None = None,
    cfg: TrainConfig | None = None,
    budget: SearchConfig | None = None,
    prepared: Prepared | None = None,
    progress: bool | None = None,
    on_trial: Callable[[dict[str, Any], TwoTowerModel], None] | None = None,
) -> TwoTowerModel:
    """Train a few settings, keep the model with the best validation recall; its info carries every trial.

    on_trial(trial, model) is called after each trial (the benchmark keeps the first: the defaults)."""
    tower, cfg, budget = tower or TowerConfig(), cfg or TrainConfig(), budget or SearchConfig()
    if budget.max_trials < 1 or budget.budget_s < 0:
        raise ConfigError(f"search needs max_trials >= 1 and budget_s >= 0, got {budget.max_trials}, {budget.budget_s}")
    t0 = time.perf_counter()
    # history_len is not a knob of the search, so every trial trains on the same prepared data
    p = prepared if prepared is not None else prepare(data, tower.history_len)
    key = f"val_recall@{cfg.eval_k}"
    trials: list[dict[str, Any]] = []
    tried: set[tuple] = set()
    best_model: TwoTowerModel | None = None
    best_tower, best_cfg, best_score = tower, cfg, -np.inf
    stopped = "search space exhausted"

    def run(t: TowerConfig, c: TrainConfig) -> None:
        nonlocal best_model, best_tower, best_cfg, best_score
        s0 = time.perf_counter()
        model = fit(p, str(data), t, c, progress=False)
        score = float(model.info[key])
        trial = {
            "trial": len(trials) + 1,
            **_settings(t, c),
            key: round(score, 6),
            "best_epoch": model.info["best_epoch"],
            "seconds": round(time.perf_counter() - s0, 1),
        }
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial, model)
        kept = score > best_score + MIN_GAIN
        if kept:
            best_model, best_tower, best_cfg, best_score = model, t, c, score
        log.info("search trial %s%s", trial, " (best)" if kept else "")
        if progress is not False:
            print(
                f"trial {trial['trial']}: {_settings(t, c)} -> {key} {score:.4f} "
                f"(epoch {trial['best_epoch']}, {trial['seconds']} s){'  * best' if kept else ''}",
                flush=True,
            )

    # the given settings first, then one knob changed at a time from the best so far
    candidates: list[tuple[str, float] | None] = [None, *((knob, v) for knob, values in STAGES for v in values)]
    for change in candidates:
        t, c = (tower, cfg) if change is None else _with(best_tower, best_cfg, *change)
        sig = tuple(sorted(_settings(t, c).items()))
        if sig in tried:
            continue
        if len(trials) >= budget.max_trials:
            stopped = f"max_trials ({budget.max_trials})"
            break
        elapsed = time.perf_counter() - t0
        mean = float(np.mean([x["seconds"] for x in trials])) if trials else 0.0
        if trials and elapsed + mean > budget.budget_s:
            stopped = f"budget_s ({budget.budget_s:g} s)"
            break
        tried.add(sig)
        if trials:  # a later trial that runs long is cut at the search's limit (the first always trains in full)
            left = budget.budget_s - elapsed
            c = dataclasses.replace(c, max_seconds=left if c.max_seconds is None else min(c.max_seconds, left))
        run(t, c)
    assert best_model is not None  # the first trial always runs
    best_model.info["search"] = {
        "chosen": _settings(best_tower, best_cfg),
        key: round(best_score, 6),
        "trials": trials,
        "stopped_by": stopped,
        "budget_s": budget.budget_s,
        "max_trials": budget.max_trials,
        "seconds": round(time.perf_counter() - t0, 1),
        "scored_on": "validation split",
    }
    return best_model

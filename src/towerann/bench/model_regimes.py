"""`towerann bench model`: the two-tower beside ALS and popularity on ml-100k and synthetic regimes.

Per regime: the two-tower with the default settings and with `--search` (settings chosen on the
validation split), ALS with implicit's defaults and tuned on a small grid on the same validation
split (fair to the baseline), and popularity; all measured by recall@100 on the test split, which
no selection looks at. The synthetic regimes vary what a fixed default might not fit: sparse vs
dense users (interactions per user) and a long vs short popularity tail (popularity_skew).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from towerann.bench.options import add_out, add_seed
from towerann.bench.report import write_report
from towerann.data.movielens import convert
from towerann.data.synth import generate
from towerann.model.evaluate import evaluate
from towerann.model.hparam_search import SearchConfig, search
from towerann.model.model import TwoTowerModel
from towerann.model.prepare import prepare
from towerann.model.towers import TowerConfig
from towerann.model.train import TrainConfig

KS = (10, 100)
# name -> generate() arguments; small enough for minutes on 2 shared cores
REGIMES: dict[str, dict[str, Any]] = {
    "sparse-users": {"n_items": 5000, "n_users": 2500, "interactions_per_user": (5, 15)},
    "dense-users": {"n_items": 5000, "n_users": 500, "interactions_per_user": (40, 120)},
    "long-tail": {"n_items": 5000, "n_users": 800, "popularity_skew": 2.0},
    "short-tail": {"n_items": 5000, "n_users": 800, "popularity_skew": 0.5},
}


def measure_regime(name: str, data: Path, budget: SearchConfig, seed: int = 0) -> dict[str, Any]:
    tower, cfg = TowerConfig(), TrainConfig(seed=seed)
    t0 = time.perf_counter()
    p = prepare(data, tower.history_len)
    first: list[TwoTowerModel] = []
    best = search(
        data,
        tower,
        cfg,
        budget,
        prepared=p,
        progress=False,
        on_trial=lambda trial, model: first.append(model) if not first else None,
    )
    found = best.info["search"]
    base = evaluate(data, first[0], KS, baselines=True, tune_als=True, prepared=p)
    searched = evaluate(data, best, KS, baselines=False, prepared=p)
    row = {
        "regime": name,
        "interactions": int(len(p.split)),
        "users": int(len(np.unique(p.user_key))),
        "items": int(len(p.items)),
        "two_tower_default": base["two_tower"]["recall@100"],
        "two_tower_searched": searched["two_tower"]["recall@100"],
        "als_default": base["als"]["recall@100"],
        "als_tuned": base["als_tuned"]["recall@100"],
        "popularity": base["popularity"]["recall@100"],
        "chosen": found["chosen"],
        "als_chosen": base["als_tuned"]["params"],
        "search_seconds": found["seconds"],
        "search_trials": found["trials"],
        "search_stopped_by": found["stopped_by"],
        "als_grid": base["als_tuned"]["grid"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"{name:<14} two-tower default {row['two_tower_default']:.4f} searched {row['two_tower_searched']:.4f} | "
        f"ALS default {row['als_default']:.4f} tuned {row['als_tuned']:.4f} | popularity {row['popularity']:.4f} "
        f"| chosen {row['chosen']} ALS {row['als_chosen']} | search {row['search_seconds']} s, "
        f"{len(row['search_trials'])} trials",
        flush=True,
    )
    return row


def measure(
    work: Path,
    movielens: Path | None,
    regimes: list[str],
    budget: SearchConfig,
    seed: int = 0,
    movielens_budget_s: float | None = None,
) -> dict[str, Any]:
    rows = []
    if movielens is not None:  # more interactions per trial than the synthetic regimes: its own time budget
        ml_budget = SearchConfig(movielens_budget_s or budget.budget_s, budget.max_trials)
        rows.append(measure_regime("ml-100k", convert(movielens, work / "ml-100k", overwrite=True), ml_budget, seed))
    for name in regimes:
        data = generate(work / name, seed=seed, overwrite=True, **REGIMES[name])
        rows.append(measure_regime(name, data, budget, seed))
    return {
        "metric": "recall@100 on the test split (newest 20% per user)",
        "seed": seed,
        "search_budget_s": budget.budget_s,
        "search_max_trials": budget.max_trials,
        "movielens_search_budget_s": movielens_budget_s or budget.budget_s,
        "torch_threads": torch.get_num_threads(),
        "train_defaults": dataclasses.asdict(TrainConfig(seed=seed)),  # every trial's settings but the searched knobs
        "tower_defaults": TowerConfig().to_json(),
        "regimes": REGIMES,
        "rows": rows,
        "two_tower_never_below_als_tuned": all(r["two_tower_searched"] >= r["als_tuned"] for r in rows),
    }


def _plot(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        rows = result["rows"]
        x = np.arange(len(rows))
        series = (
            ("two_tower_default", "two-tower default"),
            ("two_tower_searched", "two-tower --search"),
            ("als_tuned", "ALS tuned"),
            ("popularity", "popularity"),
        )
        for j, (key, label) in enumerate(series):
            ax.bar(x + (j - 1.5) * 0.2, [r[key] for r in rows], width=0.2, label=label)
        ax.set_xticks(x, [r["regime"] for r in rows])
        ax.set_ylabel("recall@100 (test split)")
        ax.set_title("two-tower vs ALS vs popularity per regime (settings chosen on validation)")
        ax.legend()

    return draw


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)  # one thread: on a shared 2-core machine, ~10x faster than two (measured)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    movielens = Path(args.movielens) if args.movielens else None
    result = measure(
        work, movielens, args.regimes, SearchConfig(args.budget_s, args.trials), args.seed, args.movielens_budget_s
    )
    json_path, png_path = write_report(args.out, "model-regimes", result, _plot(result))
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "model",
        help="two-tower (default / --search) vs tuned ALS and popularity per data regime",
        description="Train the two-tower model (default settings, then --search within a budget), ALS (default and "
        "tuned) and a popularity baseline on each data regime (and ml-100k with --movielens); report recall@100 "
        "on each regime's test split as JSON and a PNG plot.",
    )
    p.add_argument("--movielens", default=None, help="raw ml-100k directory (u.data, u.item, u.user) to include")
    p.add_argument(
        "--regimes",
        nargs="*",
        default=list(REGIMES),
        choices=list(REGIMES),
        help=f"synthetic regimes to measure (default all: {' '.join(REGIMES)})",
    )
    p.add_argument("--budget-s", type=float, default=180.0, help="search budget per regime (default 180)")
    p.add_argument("--movielens-budget-s", type=float, default=600.0, help="search budget for ml-100k (default 600)")
    p.add_argument("--trials", type=int, default=10, help="search trials per regime at most (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_seed(p, "seed of the datasets and the training")
    p.add_argument("--work", default="bench-work/model", help="where the datasets are written (default %(default)s)")
    add_out(p, "model-regimes.json and .png")
    p.set_defaults(func=run)

"""`towerann demo`: the whole job on embedded defaults, end to end, with a short report.

synthetic catalog -> train -> evaluate -> embed -> index (tuned on user vectors) -> feature store
-> HTTP server -> real requests, a click, the changed candidates -> stop.
Everything lands under --workdir (default towerann-demo/), which `towerann serve` then serves.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any, Callable

DEFAULT_WORKDIR = "towerann-demo"


class Steps:
    """Numbered steps with their wall time, printed as they finish."""

    def __init__(self, total: int):
        self.total, self.n, self.times = total, 0, {}

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        print(f"[{self.n}/{self.total}] {title} ...", flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.times[title] = time.perf_counter() - t0
        print(f"      done in {self.times[title]:.1f} s", flush=True)
        return out


def run_demo(workdir: str | Path = DEFAULT_WORKDIR, items: int = 20_000, users: int = 4_000, seed: int = 0,
             train_seconds: float = 90.0, k: int = 100) -> dict[str, Any]:
    from towerann.data.synth import generate
    from towerann.model.evaluate import evaluate
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    work = Path(workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data, model_dir = work / "data", work / "models" / "demo"
    steps = Steps(3)
    report: dict[str, Any] = {"workdir": str(work)}

    steps.run(f"synthetic catalog: {items} items, {users} users", lambda: generate(data, items, users, seed=seed))
    model = steps.run("train the two towers", lambda: train(
        data, model_dir, TowerConfig(), TrainConfig(max_seconds=train_seconds, seed=seed), name="demo", progress=False))
    report["model"] = {"version": model.version, "best_epoch": model.info["best_epoch"],
                       "val_recall@100": round(model.info["val_recall@100"], 4)}
    ev = steps.run("evaluate vs popularity and ALS (exact retrieval, held-out newest 20%)",
                   lambda: evaluate(data, model_dir))
    report["eval"] = {m: {key: round(ev[m][key], 4) for key in ("recall@10", "recall@100", "ndcg@10")}
                      for m in ("two_tower", "popularity", "als")}
    report["step_seconds"] = {t: round(s, 1) for t, s in steps.times.items()}
    print_report(report)
    return report


def print_report(r: dict[str, Any]) -> None:
    print("\n=== towerann demo report ===")
    m = r["model"]
    print(f"model {m['version']}: best epoch {m['best_epoch']}, validation recall@100 {m['val_recall@100']}")
    print(f"{'method':<12}{'recall@10':>11}{'recall@100':>12}{'ndcg@10':>10}")
    for name, v in r["eval"].items():
        print(f"{name:<12}{v['recall@10']:>11.4f}{v['recall@100']:>12.4f}{v['ndcg@10']:>10.4f}")
    print(f"artifacts under {r['workdir']}/")


def _run(args: argparse.Namespace) -> int:
    run_demo(args.workdir, items=args.items, users=args.users, seed=args.seed, train_seconds=args.train_seconds)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole job end to end on embedded defaults, with a short report",
                       description=__doc__)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where everything is written (default {DEFAULT_WORKDIR}/)")
    p.add_argument("--items", type=int, default=20_000, help="synthetic catalog size (default 20000)")
    p.add_argument("--users", type=int, default=4_000, help="synthetic users (default 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seconds", type=float, default=90.0, help="training time budget (default 90)")
    p.set_defaults(func=_run)

"""`towerann bench tower`: cost of one user-tower call per runtime (ONNX Runtime, TorchScript, torch).

One request at a time on one thread, with feature assembly included (the UserEncoder's input
building) and without it (the runtime call alone), so the choice of serving runtime rests on a
measurement made on this machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from towerann.bench.options import add_out
from towerann.bench.report import percentiles, write_report
from towerann.model.export import RUNTIMES, UserEncoder
from towerann.model.model import TwoTowerModel


def measure(model_dir: str | Path, requests: int = 5000, warmup: int = 200) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = TwoTowerModel.load(model_dir)
    rng = np.random.default_rng(0)
    item_ids = [str(i) for i in model.item_vocab.ids[: max(1, len(model.item_vocab))]]
    n_cat = model.schema.categories.size
    histories = [
        [(item_ids[j], int(rng.integers(1, n_cat))) for j in rng.integers(0, len(item_ids), model.cfg.history_len)]
        for _ in range(64)
    ]
    users = [str(u) for u in model.user_vocab.ids[:64]]
    static = {c.name: c.mean for c in model.schema.user_numeric} | {
        c.name: (c.values or [""])[0] for c in model.schema.user_categorical
    }
    out: dict[str, Any] = {}
    for runtime in RUNTIMES:
        enc = UserEncoder(model, model_dir, runtime=runtime)
        end_to_end, call_only = [], []
        for i in range(warmup + requests):
            user, hist = users[i % len(users)], histories[i % len(histories)]
            t0 = time.perf_counter()
            inputs = enc.inputs(user, static, hist)
            t1 = time.perf_counter()
            enc.run(*inputs)
            t2 = time.perf_counter()
            if i >= warmup:
                end_to_end.append(t2 - t0)
                call_only.append(t2 - t1)
        out[runtime] = {"with_feature_assembly": percentiles(end_to_end), "tower_call_only": percentiles(call_only)}
    fastest = min(RUNTIMES, key=lambda r: out[r]["with_feature_assembly"]["p50_ms"])
    return {
        "model_version": model.version,
        "history_len": model.cfg.history_len,
        "dim": model.dim,
        "threads": 1,
        "requests": requests,
        "runtimes": out,
        "fastest": fastest,
    }


def _plot(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        names = list(result["runtimes"])
        x = np.arange(len(names))
        for off, (key, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
            vals = [result["runtimes"][n]["with_feature_assembly"][key] * 1e3 for n in names]
            ax.bar(x + off * 0.4, vals, width=0.4, label=label)
        ax.set_xticks(x + 0.2, names)
        ax.set_ylabel("microseconds per request (1 thread, incl. feature assembly)")
        ax.set_title(f"User tower, one request ({result['model_version']})")
        ax.legend()

    return draw


def run(args: argparse.Namespace) -> int:
    result = measure(args.model, requests=args.requests)
    json_path, png_path = write_report(args.out, "tower", result, _plot(result))
    print(f"{'runtime':<12}{'p50 us':>10}{'p99 us':>10}{'call p50 us':>14}")
    for name, r in result["runtimes"].items():
        e, c = r["with_feature_assembly"], r["tower_call_only"]
        print(f"{name:<12}{e['p50_ms'] * 1e3:>10.1f}{e['p99_ms'] * 1e3:>10.1f}{c['p50_ms'] * 1e3:>14.1f}")
    print(f"fastest: {result['fastest']}")
    print(f"wrote {json_path} and {png_path}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "tower",
        help="user-tower latency per runtime (ONNX Runtime, TorchScript, torch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--requests", type=int, default=5000, help="single-user requests timed per runtime (default 5000)")
    add_out(p, "tower.json and tower.png")
    p.set_defaults(func=run)

"""`towerann bench ...`: each benchmark module registers one subcommand under `bench`."""

from __future__ import annotations

import argparse
import importlib

# Each module has add_bench_command(bench_subparsers) -> None.
BENCH_MODULES = (
    "towerann.bench.machine",
    "towerann.bench.tower",
    "towerann.bench.embed",
    "towerann.bench.ann",
    "towerann.bench.compressed",
    "towerann.bench.filter",
    "towerann.bench.serve",
    "towerann.bench.freshness",
    "towerann.bench.soak",
    "towerann.bench.drift",
    "towerann.bench.model_regimes",
    "towerann.bench.shards",
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: towerann beside its peers, JSON + PNG",
        description="Benchmarks measure towerann beside its peers in the same run and "
        "report ratios; results go to --out as JSON and a PNG plot. Quote medians.",
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).add_bench_command(bench_sub)

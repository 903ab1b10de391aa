"""The options the benchmarks share: declared once (towerann.bench.options), so every benchmark spells and
defaults them alike; and the parsers of their comma-separated values."""

from __future__ import annotations

import argparse
import importlib

import pytest

from towerann.bench import capacity
from towerann.bench.commands import BENCH_MODULES
from towerann.bench.options import OUT, WORKDIR, parse_csv, parse_ks
from towerann.errors import ConfigError


def _benchmarks() -> dict[str, argparse.ArgumentParser]:
    """Each benchmark's parser (and `towerann plan`'s), as the CLI registers them."""
    sub = argparse.ArgumentParser().add_subparsers()
    for name in BENCH_MODULES:
        importlib.import_module(name).add_bench_command(sub)
    capacity.add_commands(sub)
    return dict(sub.choices)


def test_lists_are_split_on_commas_and_an_empty_or_bad_one_is_refused() -> None:
    assert parse_csv(" hnsw, ivfpq ,,exact", "--backends") == ("hnsw", "ivfpq", "exact")
    assert parse_ks("100,1000") == (100, 1000)
    with pytest.raises(ConfigError, match="--backends"):
        parse_csv(" , ", "--backends")
    with pytest.raises(ConfigError, match="comma-separated integers"):
        parse_ks("100,many")


def test_every_benchmark_defaults_the_shared_options_alike() -> None:
    benches = _benchmarks()
    assert {"ann", "pq", "filter", "serve", "freshness", "soak", "shards", "embed", "plan"} <= benches.keys()
    for name, p in benches.items():
        if name != "plan":
            assert p.get_default("out") == OUT, name
        if p.get_default("recall") is not None:
            assert p.get_default("recall") == 0.95, name
        if p.get_default("dim") is not None:
            assert p.get_default("dim") in (64, 128), name
        if isinstance(p.get_default("k"), str):  # a list of K: every one measured
            assert parse_ks(p.get_default("k")) == (100, 1000), name
        if p.get_default("workdir") is not None:
            assert p.get_default("workdir") == WORKDIR, name


def test_options_parse_to_their_types_and_quick_runs_leave_the_size_to_the_benchmark() -> None:
    benches = _benchmarks()
    for name in ("ann", "pq"):
        args = benches[name].parse_args(["--quick"])
        assert args.items is None and args.users is None and args.quick, name
    args = benches["serve"].parse_args(["--items", "5000", "--dim", "32", "--k", "10", "--recall", "0.9"])
    assert (args.items, args.dim, args.k, args.recall, args.kind) == (5000, 32, 10, 0.9, "hnsw")
    plan = benches["plan"].parse_args(["--items", "1e9"])
    assert (plan.items, plan.kind, plan.k) == (1e9, "ivfpq", 1000)

"""`towerann data ...`: make datasets (synthetic, or converted from MovieLens)."""

from __future__ import annotations

import argparse
import time


def _summary(verb: str, path: object, counts: dict[str, int], seconds: float) -> str:
    return (
        f"{verb} {path}: {counts['items']:,} items, {counts['users']:,} users, "
        f"{counts['interactions']:,} interactions in {seconds:.1f}s"
    )


def _synth(args: argparse.Namespace) -> int:
    from towerann.data.dataset import validate_dataset
    from towerann.data.synth import generate

    t0 = time.perf_counter()
    out = generate(
        args.out, args.items, args.users, seed=args.seed, n_categories=args.categories, overwrite=args.overwrite
    )
    print(_summary("wrote synthetic dataset", out, validate_dataset(out)["counts"], time.perf_counter() - t0))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from towerann.data.dataset import validate_dataset
    from towerann.data.movielens import convert

    t0 = time.perf_counter()
    out = convert(args.path, args.out, overwrite=args.overwrite)
    info = validate_dataset(out)
    print(_summary(f"wrote {info['manifest']['source']} dataset", out, info["counts"], time.perf_counter() - t0))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make datasets: synthetic, or converted from MovieLens")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "synth",
        help="generate a seeded synthetic catalog, users and interactions",
        description="Generate a synthetic dataset (streamed; 10M items fit in well under 1 GiB).",
    )
    p.add_argument("--items", type=int, required=True, help="number of items")
    p.add_argument("--users", type=int, required=True, help="number of users")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files; default 0)")
    p.add_argument(
        "--categories", type=int, default=None, help="number of categories (default: items/500, clamped to 8..1000)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "movielens",
        help="convert a MovieLens folder (ml-100k or ml-latest CSV)",
        description="Convert MovieLens ml-100k (u.data, u.item, u.user) or a 'latest' release "
        "(ratings.csv, movies.csv) to the dataset layout; ratings become weights.",
    )
    p.add_argument("--path", required=True, help="the unpacked MovieLens folder")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_movielens)

"""The command-line options the benchmarks share, declared once, and the parsers of their list values.

Each `add_*` function adds one group of options to a benchmark's parser with the same names, types and
help everywhere; a benchmark passes its own defaults. Cheap to import (argparse only): `towerann plan`
and every `bench` subcommand register through here before anything is measured.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from towerann.errors import ConfigError

OUT = "bench-results"  # --out: where every benchmark writes its JSON and PNG
WORKDIR = "bench-work"  # --workdir: the cached workload shared by bench serve, freshness and soak


def parse_csv(text: str, what: str) -> tuple[str, ...]:
    """The items of a comma-separated option value (blanks dropped); `what` names the option in the error."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise ConfigError(f"{what}: give a comma-separated list, got {text!r}")
    return items


def parse_ks(text: str) -> tuple[int, ...]:
    """--k given as a comma-separated list of integers (100,1000)."""
    try:
        return tuple(int(x) for x in parse_csv(text, "--k"))
    except ValueError as e:
        raise ConfigError(f"--k: expected comma-separated integers like 100,1000, got {text!r}") from e


def _quick(value: int | None) -> str:
    return "" if value is None else f"; --quick: {value}"


def add_catalog(
    p: argparse.ArgumentParser,
    items: int,
    *,
    users: int | None = None,
    dim: int | None = 128,
    quick: tuple[int, int] | None = None,
    trained: bool = False,
) -> None:
    """--items (catalog size), --users (a synthetic dataset's users; when `users` is given) and --dim (when
    `dim` is). `quick`: the (items, users) of a --quick run; --items and --users then default to None and
    the benchmark picks. `trained`: the vectors come from a model the benchmark trains."""
    quick_items, quick_users = quick if quick is not None else (None, None)
    p.add_argument(
        "--items",
        type=int,
        default=None if quick else items,
        help=f"catalog size (default {items}{_quick(quick_items)})",
    )
    if users is not None:
        p.add_argument(
            "--users",
            type=int,
            default=None if quick else users,
            help=f"synthetic users (default {users}{_quick(quick_users)})",
        )
    if dim is not None:
        add_dim(p, dim, trained=trained)


def add_dim(p: argparse.ArgumentParser, default: int = 128, *, trained: bool = False) -> None:
    """--dim: the vectors' dimension (`trained`: that of the model the benchmark trains)."""
    what = "vector dimension of the model trained for the bench" if trained else "vector dimension"
    p.add_argument("--dim", type=int, default=default, help=f"{what} (default {default})")


def add_given_vectors(p: argparse.ArgumentParser) -> None:
    """--vectors and --queries: measure on vectors made elsewhere instead of a synthetic dataset."""
    p.add_argument("--vectors", default=None, help="use this vectors directory instead of a synthetic dataset")
    p.add_argument("--queries", default=None, help="with --vectors: .npy file of user-tower query vectors [m, dim]")


def add_ks(p: argparse.ArgumentParser, default: str = "100,1000") -> None:
    """--k as a list (parse_ks): every K is measured."""
    p.add_argument("--k", default=default, help=f"comma-separated K values (default {default})")


def add_k(p: argparse.ArgumentParser, default: int, what: str = "candidates per request") -> None:
    """--k as one number."""
    p.add_argument("--k", type=int, default=default, help=f"{what} (default {default})")


def add_kind(
    p: argparse.ArgumentParser, default: str = "hnsw", *, choices: Sequence[str] | None = None, what: str = ""
) -> None:
    """--kind: the index backend (`what`: of what, e.g. "of the served bundle")."""
    p.add_argument(
        "--kind",
        default=default,
        choices=choices,
        help=f"index backend{' ' + what if what else ''} (default {default})",
    )


def add_recall(p: argparse.ArgumentParser, what: str, default: float = 0.95, note: str = "") -> None:
    """--recall: the recall@K target (`what` says of what; `note` follows the default in the help)."""
    p.add_argument("--recall", type=float, default=default, help=f"{what} (default {default:g}{note})")


def add_backends(p: argparse.ArgumentParser, backends: Sequence[str], what: str = "backends") -> None:
    """--backends: a comma-separated subset of `backends` (parse_csv), all of them by default."""
    p.add_argument("--backends", default=",".join(backends), help=f"{what} (default {','.join(backends)})")


def add_seed(p: argparse.ArgumentParser, what: str) -> None:
    """--seed (`what`: what it seeds, e.g. "catalog seed")."""
    p.add_argument("--seed", type=int, default=0, help=f"{what} (default 0)")


def add_quick(p: argparse.ArgumentParser, what: str = "small dataset and few settings (smoke run)") -> None:
    """--quick: a smoke run."""
    p.add_argument("--quick", action="store_true", help=what)


def add_out(p: argparse.ArgumentParser, files: str = "the JSON and PNG") -> None:
    """--out: the directory the report (`files`) goes to."""
    p.add_argument("--out", default=OUT, help=f"directory for {files} (default {OUT}/)")


def add_workdir(p: argparse.ArgumentParser, what: str = "workload cache, shared with bench serve") -> None:
    """--workdir: where the bench serve workload (catalog, model, bundle) is built once and reused."""
    p.add_argument("--workdir", default=WORKDIR, help=f"{what} (default {WORKDIR}/)")

"""`towerann data ...`: make datasets (synthetic, converted from MovieLens, or imported from your own tables)."""

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


def _names(values: list[str] | None) -> list[str]:
    """Repeatable comma lists (`--drop a,b --drop c`) -> ["a", "b", "c"]."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


def _columns(value: str | None, flag: str) -> tuple[str, ...] | None:
    from towerann.errors import ConfigError

    if value is None:
        return None
    names = tuple(_names([value]))
    if not names:
        raise ConfigError(f"{flag}: give the column names, comma-separated (e.g. user_id,item_id,rating,timestamp)")
    return names


def _separator(value: str | None) -> str | None:
    from towerann.errors import ConfigError

    if value is None:
        return None
    sep = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(value, value)
    if len(sep) != 1:
        raise ConfigError(f"--sep {value!r}: a separator is one character (or 'tab')")
    return sep


def _import(args: argparse.Namespace) -> int:
    from towerann.data.table_import import ImportOptions, TableFile, import_tables

    options = ImportOptions(
        user_id=args.user_id,
        item_id=args.item_id,
        timestamp=args.timestamp,
        weight=args.weight,
        category=args.category,
        category_flags=tuple(_names(args.category_flags)),
        available=args.available,
        drop=frozenset(_names(args.drop)),
        categorical=frozenset(_names(args.categorical)),
        sep=_separator(args.sep),
        encoding=args.encoding,
    )

    def table(path: str | None, columns: str | None, flag: str) -> TableFile | None:
        names = _columns(columns, flag)
        if path is None:
            if names is not None:
                from towerann.errors import ConfigError

                raise ConfigError(f"{flag} names the columns of a file that was not given")
            return None
        return TableFile(path, names)

    interactions = table(args.interactions, args.interactions_columns, "--interactions-columns")
    assert interactions is not None
    result = import_tables(
        args.out,
        interactions,
        table(args.items, args.items_columns, "--items-columns"),
        table(args.users, args.users_columns, "--users-columns"),
        options,
        overwrite=args.overwrite,
    )
    notes = []
    if result.derived:
        notes.append(f"{' and '.join(result.derived)} derived from the interactions")
    if result.dropped:
        notes.append(f"empty columns left out: {'; '.join(result.dropped)}")
    if result.ignored:
        notes.append(f"interaction columns not used: {'; '.join(result.ignored)}")
    line = _summary("imported", result.path, result.counts, result.seconds)
    print(line + "".join(f"; {n}" for n in notes))
    return 0


IMPORT_EPILOG = """\
Types: a Parquet column keeps its type; a text column is typed by all its values (numbers -> numeric
feature, true/false -> 0/1 numeric feature, anything else -> categorical; numbers mixed with text is an
error unless --categorical names the column). Ids are int64 when every file has integer ids, else text.
Timestamps: unix seconds, or dates (ISO 8601, or one format pandas infers). Without --items the items are
the interactions' item ids, all available, all in category '<none>' (as with an items file that has no
category column); without --users the users are the interactions' user ids. Text files are read twice (to
type, then to convert) in 1 MiB blocks, Parquet once in row batches; besides those, memory holds the
item and user ids (10M interactions: ~250 MiB above the command's own ~300 MiB).

example, MovieLens ml-100k's raw files (u.item: 19 genre flags; u.user: some zip codes are not numbers):
  G=unknown,action,adventure,animation,childrens,comedy,crime,documentary,drama,fantasy,film_noir,horror
  G=$G,musical,mystery,romance,sci_fi,thriller,war,western
  towerann data import --interactions u.data --interactions-columns user_id,item_id,rating,timestamp \\
    --weight rating --items u.item --items-columns item_id,title,release,video,url,$G --category-flags $G \\
    --drop title,release,url --users u.user --users-columns user_id,age,gender,occupation,zip \\
    --categorical zip --out data/
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="make datasets: synthetic, from MovieLens, or from your own tables",
        description="Writes a dataset folder (items, users, interactions as Parquet + a checked manifest.json) "
        "that `towerann train` and `towerann embed` read.",
    )
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

    p = sub.add_parser(
        "import",
        help="import your own interactions (and items, users) from Parquet or CSV files",
        description="Import interactions, and optionally items and users, from Parquet or delimited text files\n"
        "into the dataset layout (manifest included), streamed. Name the columns with the flags below; every\n"
        "other column of the items and users files is kept as a feature, typed by its values.",
        epilog=IMPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--interactions", required=True, metavar="FILE", help="interactions: Parquet (file or folder) or CSV/TSV"
    )
    p.add_argument("--items", metavar="FILE", help="items (optional: else derived from the interactions)")
    p.add_argument("--users", metavar="FILE", help="users (optional: else derived from the interactions)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--user-id", default="user_id", metavar="COL", help="user id column (default user_id)")
    p.add_argument("--item-id", default="item_id", metavar="COL", help="item id column (default item_id)")
    p.add_argument(
        "--timestamp",
        default="timestamp",
        metavar="COL",
        help="interaction time: unix seconds or dates (default timestamp)",
    )
    p.add_argument("--weight", metavar="COL", help="interaction weight, e.g. a rating (default: 'weight' if present)")
    p.add_argument("--category", metavar="COL", help="item category (default: 'category' if present, else '<none>')")
    p.add_argument(
        "--category-flags",
        action="append",
        metavar="COLS",
        help="items: 0/1 columns (comma-separated, in order); the category is the first one set, '<none>' if none",
    )
    p.add_argument(
        "--available",
        metavar="COL",
        help="item availability, true/false or 1/0 (default: 'available' if present, else all)",
    )
    p.add_argument("--drop", action="append", metavar="COLS", help="columns to leave out (comma-separated; repeatable)")
    p.add_argument(
        "--categorical", action="append", metavar="COLS", help="feature columns to keep as text whatever they hold"
    )
    p.add_argument(
        "--sep", help="separator of text files (default: by extension - .csv ',', .tsv '\\t' - else sniffed)"
    )
    p.add_argument("--encoding", default="utf-8", help="encoding of text files (default utf-8)")
    for role in ("interactions", "items", "users"):
        p.add_argument(
            f"--{role}-columns",
            metavar="NAMES",
            help=f"the {role} file has no header row: its columns' names, comma-separated, in order",
        )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import)

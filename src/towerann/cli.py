"""The `towerann` command. Each package registers its own subcommands (its `commands.py`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from towerann import __version__
from towerann.errors import TowerannError

# Packages whose commands.py adds subcommands, in the order `towerann --help` lists them.
COMMAND_MODULES = (
    "towerann.demo",
    "towerann.data.commands",
    "towerann.model.commands",
    "towerann.embed.commands",
    "towerann.index.commands",
    "towerann.cluster.commands",  # adds embed --ray and index build --kind sharded: after both
    "towerann.features.commands",
    "towerann.server.commands",
    "towerann.freshness.commands",
    "towerann.bench.commands",
    "towerann.bench.capacity",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="towerann",
        description="Retrieval stage of a two-tower recommender: item index, real-time user features, "
        "top-K candidates in milliseconds.",
    )
    parser.add_argument("--version", action="version", version=f"towerann {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TowerannError as e:
        print(f"towerann {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"towerann {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

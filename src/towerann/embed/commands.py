"""`towerann embed`: a catalog -> item vectors with the model's item tower."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a catalog with the item tower (streamed, resumable)",
        description="Stream the catalog (a dataset directory or an items .parquet file) through the "
        "model's item tower and write a vectors directory (.npy parts + manifest). An interrupted run "
        "resumes from <out>.partial/ when started again with the same model and catalog.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--items", required=True, help="dataset directory or items .parquet file")
    p.add_argument("--out", required=True, help="vectors directory to write")
    p.add_argument("--batch-size", type=int, default=16384, help="items per tower call (default 16384)")
    p.add_argument("--part-size", type=int, default=1_048_576, help="items per output part (default 1048576)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--attributes",
        type=attribute_list,
        default=(),
        metavar="COL[,COL...]",
        help="catalog columns (strings or booleans) to keep per item as filter attributes besides category, "
        "e.g. brand,in_stock: list the server's [filters] attributes here (default: none)",
    )
    p.add_argument("--no-resume", action="store_true", help="discard an unfinished run instead of resuming it")
    p.add_argument("--overwrite", action="store_true", help="replace --out and discard any unfinished run")
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from towerann.embed.runner import embed_catalog

    return report_embedding(
        lambda stats: embed_catalog(
            args.model,
            args.items,
            args.out,
            batch_size=args.batch_size,
            part_size=args.part_size,
            resume=not args.no_resume,
            overwrite=args.overwrite,
            device=args.device,
            stats=stats,
            attributes=args.attributes,
        )
    )


def attribute_list(text: str) -> tuple[str, ...]:
    """--attributes brand,in_stock -> ("brand", "in_stock"); the runner checks the names and columns."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected column names separated by commas, e.g. brand,in_stock; got {text!r}"
        )
    return names


def report_embedding(embed: Callable[[dict[str, Any]], Path]) -> int:
    """Run `embed(stats)` (a runner writing --out) and print what it did, as every embed runner reports."""
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    out = embed(stats)
    seconds = time.perf_counter() - t0
    n = stats.get("count", 0)
    print(f"embedded {n} items -> {out} in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} items/s)")
    return 0

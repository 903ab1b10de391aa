"""`towerann embed`: a catalog -> item vectors with the model's item tower."""

from __future__ import annotations

import argparse
import time


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed a catalog with the item tower (streamed, resumable)",
                       description="Stream the catalog (a dataset directory or an items .parquet file) through the "
                       "model's item tower and write a vectors directory (.npy parts + manifest). An interrupted run "
                       "resumes from <out>.partial/ when started again with the same model and catalog.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--items", required=True, help="dataset directory or items .parquet file")
    p.add_argument("--out", required=True, help="vectors directory to write")
    p.add_argument("--batch-size", type=int, default=16384, help="items per tower call (default 16384)")
    p.add_argument("--part-size", type=int, default=1_048_576, help="items per output part (default 1048576)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-resume", action="store_true", help="discard an unfinished run instead of resuming it")
    p.add_argument("--overwrite", action="store_true", help="replace --out and discard any unfinished run")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the parts as Ray tasks on a cluster (pip install 'towerann[ray]'): ADDRESS of "
                        "`ray start --head` (host:port or auto); without one, as ray.init() finds a cluster. Every "
                        "node must see --model and --items at the same paths; the driver writes --out. Same "
                        "vectors, byte for byte, as the local runner")
    p.add_argument("--cpus-per-task", type=int, default=1,
                   help="with --ray: cores (torch threads) per part task (default 1)")
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from towerann.errors import ConfigError

    stats: dict = {}
    t0 = time.perf_counter()
    if args.ray is not None:
        from towerann.cluster.embed import embed_catalog_ray

        if args.device not in (None, "cpu"):
            raise ConfigError("--device does not apply with --ray: the part tasks run the tower on CPU")
        out = embed_catalog_ray(args.model, args.items, args.out, address=args.ray or None,
                                batch_size=args.batch_size, part_size=args.part_size, resume=not args.no_resume,
                                overwrite=args.overwrite, cpus_per_task=args.cpus_per_task, stats=stats)
    else:
        from towerann.embed.runner import embed_catalog

        out = embed_catalog(args.model, args.items, args.out, batch_size=args.batch_size, part_size=args.part_size,
                            resume=not args.no_resume, overwrite=args.overwrite, device=args.device, stats=stats)
    seconds = time.perf_counter() - t0
    n = stats.get("count", 0)
    print(f"embedded {n} items -> {out} in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} items/s)")
    return 0

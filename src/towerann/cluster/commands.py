"""The cluster's option on another package's command: `embed --ray`.

Registered after `towerann.embed.commands` (cli.COMMAND_MODULES), so that cluster/ depends on embed/
and never the reverse."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

from towerann.embed.commands import report_embedding
from towerann.errors import ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:
    embed: argparse.ArgumentParser = sub.choices["embed"]  # the subcommand's parser, added by embed/
    embed.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the parts as Ray tasks on a cluster (pip install 'towerann[ray]'): ADDRESS of "
        "`ray start --head` (host:port or auto); without one, as ray.init() finds a cluster. "
        "Every node must see --model and --items at the same paths; the driver writes --out. "
        "Same vectors, byte for byte, as the local runner",
    )
    embed.add_argument(
        "--cpus-per-task", type=int, default=1, help="with --ray: cores (torch threads) per part task (default 1)"
    )
    embed.set_defaults(func=partial(_embed, embed.get_default("func")))


def _embed(local: Any, args: argparse.Namespace) -> int:
    """`embed`: on the cluster with --ray, else the local runner."""
    if args.ray is None:
        return local(args)
    if args.device not in (None, "cpu"):
        raise ConfigError("--device does not apply with --ray: the part tasks run the tower on CPU")
    from towerann.cluster.ray_embed import embed_catalog_ray

    return report_embedding(
        lambda stats: embed_catalog_ray(
            args.model,
            args.items,
            args.out,
            address=args.ray or None,
            batch_size=args.batch_size,
            part_size=args.part_size,
            resume=not args.no_resume,
            overwrite=args.overwrite,
            cpus_per_task=args.cpus_per_task,
            attributes=args.attributes,
            stats=stats,
        )
    )

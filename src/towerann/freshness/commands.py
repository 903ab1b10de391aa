"""`towerann refresh`: rebuild the bundle from the catalog + delta log and publish it (servers swap it in).

`towerann refresh --vectors FILE` publishes a vectors-only bundle instead: vectors made elsewhere, no towers,
served for `query_vector` requests (freshness.publish)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from towerann.config import load_config
from towerann.errors import ConfigError, TowerannError
from towerann.index import KINDS
from towerann.index.build import AUTO_HELP
from towerann.index.commands import TUNE_K, TUNE_K_HELP, parse_params

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "refresh",
        help="re-embed the catalog (+ the delta log) and publish a new bundle for hot swap",
        description="Re-embed the catalog with the item tower, fold in the delta log up to a cut-off, build "
        "the index and publish a new bundle (CURRENT). Running servers notice it (they poll CURRENT "
        "every [freshness] poll_s), validate it, replay writes newer than the cut-off and swap it in. "
        "Pass --model to ship a newly trained model: user and item tower swap with the index. "
        "With --vectors FILE it publishes a vectors-only bundle instead: vectors made elsewhere (a Parquet "
        "file with an id and a list-of-floats column, or a .npy matrix with --ids), no user or item tower; "
        "`towerann serve` then answers query_vector requests, filtered by category and --attributes columns.",
    )
    p.add_argument("--config", default=None, help="TOML config file (the server's); flags override it")
    p.add_argument("--data", default=None, help="dataset directory with items.parquet (default [paths] data)")
    p.add_argument(
        "--model",
        default=None,
        help="model directory (default: the model of the bundle now current, else [paths] model)",
    )
    p.add_argument("--index", default=None, help="bundle root with CURRENT (default [paths] index)")
    p.add_argument(
        "--kind",
        default="auto",
        choices=("auto", *KINDS),
        help=f"index backend: {', '.join(('auto', *KINDS))} (default %(default)s; {AUTO_HELP})",
    )
    p.add_argument(
        "--recall",
        type=float,
        default=0.95,
        help="tune to this recall@k on the dataset's held-out user queries (--vectors: on --queries, else on "
        "a sample of the catalog's own vectors) (default %(default)s)",
    )
    p.add_argument("--k", type=int, default=TUNE_K, help=TUNE_K_HELP)
    v = p.add_argument_group("vectors made elsewhere (a vectors-only bundle: no model)")
    v.add_argument("--vectors", default=None, metavar="FILE", help="a .parquet file, or a .npy [n, dim] matrix")
    v.add_argument("--ids", default=None, metavar="IDS.npy", help="--vectors .npy: the item id per row")
    v.add_argument("--id-column", default="item_id", help="Parquet: the item id column (default %(default)s)")
    v.add_argument("--vector-column", default="vector", help="Parquet: the vector column (default %(default)s)")
    v.add_argument("--category-column", default=None, help="Parquet: the category column (filter 'categories')")
    v.add_argument("--available-column", default=None, help="Parquet: a true/false availability column")
    v.add_argument(
        "--attributes",
        default=None,
        metavar="COL,...",
        help="Parquet: columns requests may filter on besides category (default [filters] attributes)",
    )
    v.add_argument(
        "--space-id",
        default=None,
        metavar="NAME",
        help="the vector space's name in the bundle manifest (default: the file's version, external-<checksum>)",
    )
    v.add_argument("--normalize", action="store_true", help="L2-normalise the vectors (cosine) before indexing")
    v.add_argument(
        "--queries",
        default=None,
        metavar="Q.npy",
        help="tuning queries [n, dim] from the same space; default: a sample of the catalog's own vectors, "
        "which overestimates recall (an item vector finds its neighbours more easily than a user's query does)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an index build or search param, as for `towerann index build` (repeatable)",
    )
    p.add_argument("--keep", type=int, default=3, help="bundle versions to keep for rollback (default 3)")
    p.add_argument(
        "--every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="repeat every SECONDS (e.g. 3600 for hourly) until interrupted; default: "
        "[freshness] refresh_every_s, 0 = once",
    )
    p.set_defaults(func=_refresh)


def _refresh(args: argparse.Namespace) -> int:
    from towerann.freshness.deltalog import open_configured_delta_log
    from towerann.freshness.log_binding import bind_delta_log
    from towerann.freshness.refresh import refresh

    if args.every is not None and args.every < 0:
        raise ConfigError("--every must be >= 0 seconds")
    cfg = load_config(args.config).with_overrides(
        paths_index=args.index, paths_data=args.data, freshness_refresh_every_s=args.every
    )
    every = cfg.freshness.refresh_every_s  # --every, else the config's schedule
    root = Path(cfg.paths.index)
    while True:
        if not args.vectors and not args.model and _current_is_vectors_only(root):
            raise ConfigError(
                f"{root}: the current bundle is vectors-only (no model): give --vectors FILE for its new "
                "version, or --model DIR to publish a bundle with towers"
            )
        model = args.model or _current_model(root) or cfg.paths.model
        delta = open_configured_delta_log(cfg)
        try:
            bind_delta_log(root, delta, _current_cut(root), adopt=cfg.freshness.adopt_log)  # this root's own log
            out = (
                _refresh_vectors(args, cfg.filters.attributes, root, delta)
                if args.vectors
                else refresh(
                    cfg.paths.data,
                    model,
                    root,
                    delta,
                    kind=args.kind,
                    recall=args.recall,
                    k=args.k,
                    keep=args.keep,
                    attributes=cfg.filters.attributes,
                    params=parse_params(args.param) or None,
                )
            )
        except TowerannError as e:
            if not every:
                raise
            log.error("refresh failed: %s; next try in %.0fs", e, every)
        else:
            print(
                f"published {out['path']}: {out['items']} items, delta log folded up to seq {out['delta_seq']}, "
                f"{out['seconds']:.1f}s"
            )
        finally:
            delta.close()
        if not every:
            return 0
        time.sleep(every)


def _refresh_vectors(args: argparse.Namespace, configured: tuple[str, ...], root: Path, delta: Any) -> dict[str, Any]:
    import numpy as np

    from towerann.freshness.refresh import refresh_vectors

    if args.model or args.data:
        raise ConfigError("--vectors publishes a bundle without a model: drop --model and --data")
    attributes = configured if args.attributes is None else tuple(a for a in args.attributes.split(",") if a)
    queries = None
    if args.queries:
        try:
            queries = np.load(args.queries, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--queries {args.queries}: not a readable .npy file ({e})") from e
    return refresh_vectors(
        args.vectors,
        root,
        delta,
        ids=args.ids,
        id_column=args.id_column,
        vector_column=args.vector_column,
        category_column=args.category_column,
        available_column=args.available_column,
        attributes=attributes,
        normalize=args.normalize,
        queries=queries,
        kind=args.kind,
        recall=args.recall,
        k=args.k,
        keep=args.keep,
        params=parse_params(args.param),
        space_id=args.space_id,
    )


def _current_is_vectors_only(root: Path) -> bool:
    from towerann.index.snapshot import resolve
    from towerann.serving.bundle import space_id_of

    try:
        return space_id_of(resolve(root)) is not None
    except TowerannError:
        return False


def _current_model(root: Path) -> str | None:
    from towerann.index.snapshot import resolve

    try:
        model = resolve(root) / "model"
    except TowerannError:
        return None
    return str(model) if model.is_dir() else None


def _current_cut(root: Path) -> int:
    """The delta_seq of the bundle CURRENT names (0 when there is none yet)."""
    from towerann.artifacts import read_manifest
    from towerann.index.snapshot import FORMAT_VERSION, KIND, resolve

    try:
        manifest = read_manifest(resolve(root), KIND, FORMAT_VERSION)
    except TowerannError:
        return 0
    return int((manifest.get("bundle") or {}).get("delta_seq", 0))

"""`towerann features ...`: load a dataset's user features into a store, inspect a store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from towerann.config import load_config
from towerann.features import FeatureStore, open_store
from towerann.storeurl import parse_store_url, redact


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "features",
        help="user feature store: load static features and history",
        description="The store `towerann serve` reads user features from (the one [features] store names): "
        "load a dataset's users and their recent items into it, print its counts, or one user's features.",
    )
    sub = p.add_subparsers(dest="features_command", metavar="ACTION", required=True)

    load = sub.add_parser(
        "load",
        help="load users.parquet + interaction history of a dataset into a store",
        description="Write every user of a dataset into the store: their static features (users.parquet) and "
        "their last --recent items (interactions.parquet), --batch-size users per write. A user already "
        "there gets the dataset's record instead.",
    )
    load.add_argument("--data", required=True, help="dataset folder with users.parquet and interactions.parquet")
    _store_args(load)
    load.add_argument(
        "--recent",
        type=int,
        default=50,
        metavar="N",
        help="keep each user's last N items from the interactions as history (default 50)",
    )
    load.add_argument("--batch-size", type=int, default=5000, help="users per write (default 5000)")
    load.set_defaults(func=_load)

    stats = sub.add_parser(
        "stats",
        help="print a store's counts as JSON",
        description="Print the store's counts and settings as the backend reports them, as JSON (a Redis URL's "
        "password never appears).",
    )
    _store_args(stats)
    stats.set_defaults(func=_stats)

    get = sub.add_parser(
        "get",
        help="print one user's features as JSON",
        description="Print what the store holds for one user as JSON: known or not, static features, recent "
        "items and the session's events, as the user tower would read them.",
    )
    _store_args(get)
    get.add_argument("user_id", help="the user id (as a string)")
    get.set_defaults(func=_get)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="TOML config whose [features] store and path to use, as `towerann serve` does "
        "(default: built-in defaults, the demo's towerann-demo/features.sqlite)",
    )
    p.add_argument(
        "--store",
        default=None,
        help="embedded | embedded:///abs/path.sqlite | memory | redis://HOST:PORT/DB (default: [features] store)",
    )
    p.add_argument("--path", default=None, help="SQLite file for the embedded store (default: [features] path)")
    p.add_argument("--prefix", default="towerann:", help="key prefix (namespace) in Redis (default towerann:)")


def _store_url(args: argparse.Namespace) -> tuple[str, str | None]:
    """(store, SQLite path): the ones `towerann serve --config` reads, unless the flags say otherwise."""
    cfg = load_config(args.config).features
    store = args.store or cfg.store
    return store, args.path or (cfg.path if store == "embedded" else None)


def _open(args: argparse.Namespace) -> FeatureStore:
    store, path = _store_url(args)
    if parse_store_url(store).is_redis:
        from towerann.features.redis_store import RedisFeatureStore

        # batch work, not the request path: bulk pipelines and SCANs get generous deadlines
        return RedisFeatureStore(store, prefix=args.prefix, timeout_s=10.0, write_timeout_s=60.0)
    return open_store(store, path=path, prefix=args.prefix)


def _load(args: argparse.Namespace) -> int:
    from towerann.features.loader import load_dataset_features  # pandas: only for this command

    t0 = time.perf_counter()
    store = _open(args)
    try:
        n = load_dataset_features(store, args.data, recent_n=args.recent, batch_size=args.batch_size)
        stats = store.stats()
    finally:
        store.close()
    where = redact(_store_url(args)[0])  # a Redis URL may carry a password: never printed
    print(
        f"loaded {n} users into {where}{' (' + str(stats.get('path')) + ')' if stats.get('path') else ''} "
        f"in {time.perf_counter() - t0:.2f}s; store now holds {stats['users']} users"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        print(redact(json.dumps(store.stats(), indent=2, sort_keys=True)))
    finally:
        store.close()
    return 0


def _get(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        f = store.get_one(args.user_id)
    finally:
        store.close()
    print(
        json.dumps(
            {
                "user_id": f.user_id,
                "known": f.known,
                "static": f.static,
                "recent_items": list(f.recent_items),
                "session": [dataclasses.asdict(e) for e in f.session],
            },
            indent=2,
            sort_keys=True,
        )
    )
    return 0

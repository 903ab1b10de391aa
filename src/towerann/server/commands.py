"""`towerann serve`: the HTTP API (and with --grpc-port its gRPC twin) over a retrieval bundle and a feature store."""

from __future__ import annotations

import argparse

from towerann.config import load_config
from towerann.errors import ConfigError


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve top-K candidates over HTTP (FastAPI + uvicorn), and gRPC with --grpc-port",
        description="Serve POST /v1/candidates, POST /v1/events, /healthz, /readyz, /metrics, "
        "and (with a bearer token) POST/PATCH/DELETE /v1/items and POST /v1/admin/reload. "
        "Settings come from --config (TOML); flags override it.",
    )
    p.add_argument("--config", default=None, help="TOML config file (default: built-in defaults, see towerann.config)")
    p.add_argument("--index", default=None, help="bundle root with CURRENT, or one bundle/snapshot directory")
    p.add_argument(
        "--model",
        default=None,
        help="model directory; needed when --index is a plain snapshot from `towerann index build` (a bundle "
        "carries its own model); on a vectors-only bundle from `refresh --vectors`, a user tower of the same "
        "space id (`model import --user-tower --space-id`) that answers user_id requests (default: none)",
    )
    p.add_argument("--store", default=None, help="embedded | memory | redis://HOST:PORT/DB")
    p.add_argument("--store-path", default=None, help="SQLite file of the embedded store")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes answering on the port, each with the whole service (default [serve] workers: "
        "one per core when the feature store is Redis, else 1); several need --store redis://...",
    )
    p.add_argument("--max-k", type=int, default=None, help="largest k a request may ask for (default 1000)")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the read path over gRPC (towerann.v1.Retrieval: candidates, events, health, ready, "
        "reload) on this port, beside HTTP in the same process, with the same limits, token and errors "
        "(default [serve] grpc_port: 0, off)",
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="serve a sharded bundle's index from shard actors on the Ray cluster at ADDRESS (HOST:PORT, "
        "or 'auto'); model and id map stay in this process; one process, no hot swap (docs/shards.md)",
    )
    p.add_argument(
        "--shard-deadline-ms",
        type=float,
        default=None,
        help="--ray: how long a search waits for the shards; later ones are left out and the answer says "
        "partial (default 500)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="the log on stderr: text lines, or one JSON object per line (default [serve] log_format: text)",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one log line per request: route, status, k, latency, degraded/partial (default [serve] access_log: on)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from towerann.server.logs import configure_logging
    from towerann.server.workers import resolve_workers, run_workers
    from towerann.storeurl import redact_logging

    redact_logging()  # whatever is logged (ours, uvicorn's, redis-py's) never shows a store password

    cfg = load_config(args.config).with_overrides(
        paths_index=args.index,
        paths_model=args.model,
        features_store=args.store,
        features_path=args.store_path,
        serve_host=args.host,
        serve_port=args.port,
        serve_max_k=args.max_k,
        serve_grpc_port=args.grpc_port,
        serve_workers=args.workers,
        serve_log_format=args.log_format,
        serve_access_log=args.access_log,
    )
    # the format of every line from here on, redacted too; towerann's INFO lines start once it serves
    configure_logging(cfg.serve.log_format, access_log=cfg.serve.access_log)
    if args.shard_deadline_ms is not None and (args.ray is None or args.shard_deadline_ms <= 0):
        raise ConfigError("--shard-deadline-ms goes with --ray and must be > 0")
    from towerann.server.grpc_server import check_ports

    check_ports(cfg.serve)  # before anything is loaded
    if args.ray is not None and cfg.serve.workers == 0:  # "one per core" means one for a front over Ray shards
        cfg = cfg.with_overrides(serve_workers=1)
    n = resolve_workers(cfg)
    if n > 1 and args.ray is None:  # the parent of the workers loads nothing itself (server.workers)
        run_workers(cfg, n, model_dir=args.model)
        return 0
    from towerann.server.server import SHARD_DEADLINE_S, serve_forever

    deadline_s = SHARD_DEADLINE_S if args.shard_deadline_ms is None else args.shard_deadline_ms / 1e3
    serve_forever(cfg, model_dir=args.model, ray_address=args.ray, shard_deadline_s=deadline_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m towerann.server.commands serve ...`: the server alone, without the rest of the CLI
    (what benchmarks start in a subprocess)."""
    import logging
    import sys

    from towerann.errors import TowerannError
    from towerann.storeurl import redact

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="towerann")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TowerannError as e:
        print(f"towerann serve: error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())

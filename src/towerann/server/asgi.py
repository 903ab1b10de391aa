"""The web stack of one serving process: a Service's HTTP app and the uvicorn settings it runs under.

Both ways of serving use it: `server.py` (one process, or a background thread) and `workers.py` (each
worker of `towerann serve --workers N`), so neither imports the other for it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from towerann.server.wiring import Service
from towerann.serving.app import create_app


def app_for(
    svc: Service,
    worker: str | None = None,
    metrics_dir: str | None = None,
    freshen: Callable[[], Awaitable[None]] | None = None,
    processes: Callable[[], dict[str, int]] | None = None,
) -> FastAPI:
    return create_app(
        svc.retriever,
        svc.cfg.serve.max_body_bytes,
        svc.writer,
        svc.reloader,
        svc.token,
        max_items_per_write=svc.cfg.serve.max_items_per_write,
        worker=worker,
        metrics_dir=metrics_dir,
        freshen=freshen,
        processes=processes,
    )


def close_app(app: FastAPI | None) -> None:
    pool = getattr(getattr(app, "state", None), "write_pool", None)
    if pool is not None:
        pool.shutdown(wait=False)


def freeze_heap() -> None:
    """Exempt everything loaded so far (the bundle: models, id maps) from the cyclic GC.

    Without it, each full collection walks the million-entry id map and the model's objects and
    stalls the event loop for 100-170 ms (measured at 1M items), which is the p99 at 200 req/s.
    The reloader freezes again after a bundle swap, so the new bundle is exempt too."""
    import gc

    gc.collect()
    gc.freeze()


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    # access_log off: ours (serving.access) says more for less (uvicorn's formats each line on the loop).
    # log_config None: uvicorn's warnings go through the process's handlers (server.logs: the format,
    # redaction) instead of a stream handler of its own.
    return uvicorn.Config(
        app, host=host, port=port, access_log=False, log_level="warning", lifespan="off", log_config=None
    )

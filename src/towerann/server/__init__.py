"""The composition root: a Config becomes a running service (store, delta log, bundle holder,
reloader, HTTP app). Only this package (and the CLI) wires packages together; `serving/` holds the
request path and the bundle, `freshness/` the writes and swaps on top of it.

    svc = open_service(load_config("towerann.toml"))   # wiring.py: no web framework imported
    handle = start_background(cfg)                      # server.py: uvicorn, in a thread
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.server.wiring import Service, open_retriever, open_service

__all__ = ["Service", "open_retriever", "open_service"]

# Loaded from wiring.py on first use: the CLI imports server.commands (and so this package) for every command.
_MODULE_OF = {"Service": "wiring", "open_retriever": "wiring", "open_service": "wiring"}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)

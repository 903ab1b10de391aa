"""The composition root: a Config becomes a running service (store, delta log, bundle holder,
reloader, HTTP app). Only this package (and the CLI) wires packages together; `serving/` holds the
request path and the bundle, `freshness/` the writes and swaps on top of it.

    svc = open_service(load_config("towerann.toml"))   # wiring.py: no web framework imported
    handle = start_background(cfg)                      # server.py: uvicorn, in a thread
"""

from towerann.server.wiring import Service, open_retriever, open_service

__all__ = ["Service", "open_retriever", "open_service"]

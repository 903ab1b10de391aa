"""The access log: one INFO line per request on logger `towerann.access`, written after the answer went out.

    POST /v1/candidates 200 1.84ms k=100
    POST /v1/candidates 200 3.10ms k=100 degraded
    POST /v1/candidates 200 2.02ms k=10 partial missing_shards=1,3
    PATCH /v1/items/{item_id} 401 0.21ms
    POST /v1/items 200 12.40ms items=20

The route is the template (no ids from the path), the method one of the HTTP methods (else OTHER); no
user id, header, token or body goes in. With the JSON log format (server.logs) the same fields come as
keys: method, route, status, ms, and k, items, degraded, partial, missing_shards when they apply.

Cost: while the logger is disabled ([serve] access_log = false, or a library user's WARNING root) the
middleware checks one flag per request and builds nothing. The handlers add what only they know (k,
degraded, ...) to the request's `note`, a dict the middleware hands them through a context variable.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

ACCESS_LOGGER = "towerann.access"
access_log = logging.getLogger(ACCESS_LOGGER)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# The current request's note (None: the access log is off, nothing to note)
_note: ContextVar[dict[str, Any] | None] = ContextVar("towerann_access_note", default=None)


def note() -> dict[str, Any] | None:
    """The current request's access-log fields to fill in, or None while the access log is off."""
    return _note.get()


def start() -> tuple[dict[str, Any], Any]:
    """A fresh note for one request; returns it and the token to `finish` with."""
    fields: dict[str, Any] = {}
    return fields, _note.set(fields)


def finish(token: Any, method: str, route: str, status: int, seconds: float, fields: dict[str, Any]) -> None:
    """Write the request's line (called once its answer was sent)."""
    _note.reset(token)
    method = method if method in METHODS else "OTHER"
    ms = round(seconds * 1e3, 2)
    text = f"{method} {route} {status} {ms:.2f}ms"
    for key in ("k", "items"):
        if key in fields:
            text += f" {key}={fields[key]}"
    if fields.get("degraded"):
        text += " degraded"
    if fields.get("partial"):
        text += " partial missing_shards=" + ",".join(str(s) for s in fields.get("missing_shards", ()))
    # makeRecord + handle: logger.info would also walk the stack for the caller's file and line (unused here)
    extra = {"method": method, "route": route, "status": status, "ms": ms, **fields}
    access_log.handle(access_log.makeRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, text, (), None, extra=extra))

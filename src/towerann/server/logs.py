"""The log of a serving process: one line per record on stderr, as text or as JSON (`[serve] log_format`),
every line redacted (storeurl.RedactingFilter), uvicorn's lines in the same format.

What a server logs at INFO, besides warnings and errors:
- the access log (logger `towerann.access`, serving.access): one line per request, after its answer;
- one line per state change: a bundle swapped or refused (towerann.freshness.reload), degraded answers
  on and off (towerann.serving.retriever), a shard missing and back (towerann.index.sharded), the delta
  log's Redis losing and regaining durability (towerann.freshness.deltalog), Redis down and back
  (towerann.features.redis_store), a live re-tune started, applied, refused, failed or skipped, a recall
  target no re-tune restores, and a rebuild on drift (towerann.serving.retune_loop, towerann.server.server).

INFO lines show once the server serves (`serving()`): a server that fails to start says so in one line.

    2025-01-02 10:00:00,123 INFO towerann.access: POST /v1/candidates 200 1.84ms k=100
    {"ts": "2025-01-02T10:00:00.123Z", "level": "INFO", "logger": "towerann.access",
     "msg": "POST /v1/candidates 200 1.84ms k=100", "method": "POST", "route": "/v1/candidates",
     "status": 200, "ms": 1.84, "k": 100}                                  (one line; --log-format json)
"""

from __future__ import annotations

import json
import logging
import time
from typing import IO, Any

from towerann.serving.access import ACCESS_LOGGER
from towerann.storeurl import RedactingFilter, redact

FORMATS = ("text", "json")
# what every LogRecord has; anything else on a record came in `extra=` and goes into its JSON object
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, msg, worker (several workers), the
    record's `extra=` fields (an access line's route, status, k, ...; a state change's event, versions),
    and exc (the traceback) when there is one. Newlines inside a message stay escaped: one line each."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        trusted = record.name == ACCESS_LOGGER  # its fields come from fixed sets and numbers: nothing to redact
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value if trusted or not isinstance(value, str) else redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, default=str)


class _RedactingFilter(RedactingFilter):
    """storeurl.RedactingFilter for every record but an access line, built from fixed sets and numbers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == ACCESS_LOGGER or super().filter(record)


class _ServerHandler(logging.StreamHandler):
    """The handler configure_logging installs (told apart from others, e.g. a test's, when replaced)."""


def log_handler(log_format: str = "text", worker: str | None = None, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing redacted lines in `log_format` to `stream` (default: sys.stderr)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {FORMATS}")
    handler = _ServerHandler(stream)  # None: sys.stderr
    handler.addFilter(_RedactingFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        where = "" if worker is None else f"worker-{worker} "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s"))
    return handler


def configure_logging(log_format: str = "text", worker: str | None = None, access_log: bool = True) -> None:
    """Log to stderr in `log_format` for a serving process (`worker`: its name in every line).

    Replaces the root logger's plain stream handlers (logging.basicConfig's, or an earlier call's) and
    leaves any other handler (a test's capture) alone. The root level stays WARNING (or lower, with
    `towerann -v`): libraries stay quiet; towerann's INFO lines start with `serving()`. uvicorn's own
    loggers propagate here (server.asgi.uvicorn_config gives uvicorn no logging config of its own)."""
    handler = log_handler(log_format, worker)
    root = logging.getLogger()
    for old in list(root.handlers):
        if type(old) in (logging.StreamHandler, _ServerHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    # off: the middleware sees the logger disabled and builds nothing per request
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access_log else logging.WARNING)


def serving() -> None:
    """From now on towerann's INFO lines (access log, state changes) reach the log."""
    towerann = logging.getLogger("towerann")
    if towerann.getEffectiveLevel() > logging.INFO:
        towerann.setLevel(logging.INFO)

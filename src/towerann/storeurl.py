"""Store URLs: the one parser for where state lives (feature store, delta log), and redaction.

    "embedded"                      in-process, persisted to a SQLite file given separately
    "embedded:///abs/path.sqlite"   in-process, persisted to that file
    "memory"                        in-process, nothing persisted
    "redis://[[user]:password@]host:port/db", "rediss://...", "unix://[[user]:password@]/path?db=N"

A Redis URL may carry a password, so it is never printed as given: `redact` (and `StoreURL.safe`)
replace the credentials with `***` in anything that goes to a response, a log line or an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from towerann.errors import ConfigError

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(?P<key>[?&]password=)[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ***."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", str(text))
    return _PASSWORD_PARAM.sub(lambda m: m.group("key") + "***", text)


@dataclass(frozen=True)
class StoreURL:
    scheme: str  # "embedded" | "memory" | "redis"
    url: str  # as given: may hold a password, use `safe` in messages
    path: str | None = None  # embedded:///abs/path

    @property
    def is_redis(self) -> bool:
        return self.scheme == "redis"

    @property
    def safe(self) -> str:
        return redact(self.url)


def parse_store_url(url: object) -> StoreURL:
    """Classify a store URL; a malformed or unknown one raises ConfigError (credentials redacted)."""
    if not isinstance(url, str):
        raise ConfigError(f"a store URL must be a string such as 'embedded' or 'redis://HOST:PORT/DB', "
                          f"got {type(url).__name__}")
    if url.startswith(REDIS_SCHEMES):
        return StoreURL("redis", url)
    if url in ("embedded", "memory"):
        return StoreURL(url, url)
    if url.startswith("embedded://"):
        path = url[len("embedded://"):]
        if not path.startswith("/"):
            raise ConfigError(f"store url {url!r}: give an absolute path, e.g. embedded:///srv/features.sqlite")
        return StoreURL("embedded", url, path)
    raise ConfigError(f"unknown store {redact(url)!r}; use 'embedded', 'embedded:///abs/path.sqlite', 'memory' "
                      "or 'redis://HOST:PORT/DB'")

"""Store URLs: the one parser for where state lives (feature store, delta log), and redaction.

    "embedded"                      in-process, persisted to a SQLite file given separately
    "embedded:///abs/path.sqlite"   in-process, persisted to that file
    "memory"                        in-process, nothing persisted
    "redis://[[user]:password@]host:port/db", "rediss://...", "unix://[[user]:password@]/path?db=N"
    "feast:PATH"                    a Feast feature repository (static features; sessions per its towerann.toml)

A Redis URL may carry a password, so it is never printed as given: `redact` (and `StoreURL.safe`)
replace the credentials with `***` in anything that goes to a response, a log line or an error.
Belt and braces: every password `parse_store_url` has seen (as given and URL-decoded) is remembered
in this process, and `redact` blanks it wherever it appears, even outside a URL (a client library's
message, a URL whose password holds '@' or '/').
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from urllib.parse import unquote

from towerann.errors import ConfigError

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# userinfo runs to the last '@' before the path ('/') or a blank: a password may itself hold '@'
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/\s]*@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(?P<key>[?&]password=)[^&\s]*", re.IGNORECASE)
_MIN_SECRET = 4  # shorter "passwords" would blank ordinary words; they protect nothing anyway
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it, and every password seen in a store URL, as ***."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", str(text))
    text = _PASSWORD_PARAM.sub(lambda m: m.group("key") + "***", text)
    for secret in sorted(_secrets, key=len, reverse=True):  # a copy: sorted() reads the set once
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _remember_secrets(url: str) -> None:
    """Remember the password of a URL (userinfo after ':' or ?password=), so redact() blanks it anywhere."""
    found = []
    m = re.match(r"[a-z][a-z0-9+.-]*://(?P<userinfo>[^/\s]*)@", url, re.IGNORECASE)
    if m:
        user, _, password = m.group("userinfo").partition(":")
        found += [password or user]  # redis://:pw@ and redis://pw@ (a bare password) both occur
    found += [m.group(1) for m in re.finditer(r"[?&]password=([^&\s]*)", url, re.IGNORECASE)]
    with _secrets_lock:
        for secret in found:
            for form in (secret, unquote(secret)):
                if len(form) >= _MIN_SECRET:
                    _secrets.add(form)


@dataclass(frozen=True)
class StoreURL:
    scheme: str  # "embedded" | "memory" | "redis" | "feast"
    url: str  # as given: may hold a password, use `safe` in messages
    path: str | None = None  # embedded:///abs/path, or the feast: repository

    @property
    def is_redis(self) -> bool:
        return self.scheme == "redis"

    @property
    def safe(self) -> str:
        return redact(self.url)


def parse_store_url(url: object) -> StoreURL:
    """Classify a store URL; a malformed or unknown one raises ConfigError (credentials redacted)."""
    if not isinstance(url, str):
        raise ConfigError(
            f"a store URL must be a string such as 'embedded' or 'redis://HOST:PORT/DB', got {type(url).__name__}"
        )
    if url.startswith(REDIS_SCHEMES):
        _remember_secrets(url)
        return StoreURL("redis", url)
    if url in ("embedded", "memory"):
        return StoreURL(url, url)
    if url.startswith("feast:"):
        if not url[len("feast:") :]:
            raise ConfigError("store 'feast:' needs the feature repository's path, e.g. feast:/srv/feature_repo")
        return StoreURL("feast", url, url[len("feast:") :])
    if url.startswith("embedded://"):
        path = url[len("embedded://") :]
        if not path.startswith("/"):
            raise ConfigError(f"store url {url!r}: give an absolute path, e.g. embedded:///srv/features.sqlite")
        return StoreURL("embedded", url, path)
    raise ConfigError(
        f"unknown store {redact(url)!r}; use 'embedded', 'embedded:///abs/path.sqlite', 'memory' "
        "'redis://HOST:PORT/DB' or 'feast:REPO_PATH'"
    )


class RedactingFilter(logging.Filter):
    """A logging filter (for a handler) that passes every record through `redact`, traceback included:
    what a library below us logs cannot carry a store password either."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: leave it to the handler
            return True
        safe = redact(message)
        if safe != message:
            record.msg, record.args = safe, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logging(logger: logging.Logger | None = None) -> None:
    """Put a RedactingFilter on every handler of `logger` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())

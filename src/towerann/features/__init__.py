"""User features at request time: static features + offline history + real-time session events.

`open_store(url)` picks a backend by URL:
  "embedded"                    in-process, persisted to `path` (SQLite) or memory-only if no path
  "embedded:///abs/path.sqlite" in-process, persisted to that file
  "memory"                      in-process, nothing persisted
  "redis://host:port/db"        a Redis server shared by several serving processes
"""

from __future__ import annotations

from pathlib import Path

from towerann.errors import ConfigError
from towerann.features.base import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    Event,
    FeatureStore,
    UserFeatures,
)

__all__ = ["Event", "FeatureStore", "UserFeatures", "open_store"]


def open_store(url: str = "embedded", *, path: str | Path | None = None, max_events: int = DEFAULT_MAX_EVENTS,
               ttl_s: float = DEFAULT_TTL_S, prefix: str = "towerann:") -> FeatureStore:
    """Open the feature store that `url` names; a bad url raises ConfigError."""
    if not isinstance(url, str):
        raise ConfigError(f"feature store url must be a string, got {url!r}")
    if url in ("embedded", "memory") or url.startswith("embedded://"):
        from towerann.features.embedded import EmbeddedFeatureStore

        if url == "memory":
            if path is not None:
                raise ConfigError("feature store 'memory' keeps nothing on disk; drop --path or use 'embedded'")
        elif url.startswith("embedded://"):
            url_path = url[len("embedded://"):]
            if not url_path.startswith("/"):
                raise ConfigError(f"feature store url {url!r}: give an absolute path, e.g. embedded:///srv/features.sqlite")
            if path is not None and Path(path) != Path(url_path):
                raise ConfigError(f"feature store url {url!r} and path {str(path)!r} disagree; give one of them")
            path = url_path
        return EmbeddedFeatureStore(path, max_events=max_events, ttl_s=ttl_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from towerann.features.redis_store import RedisFeatureStore

        if path is not None:
            raise ConfigError("--path is for the embedded store; a Redis store keeps its data in the server")
        return RedisFeatureStore(url, max_events=max_events, ttl_s=ttl_s, prefix=prefix)
    raise ConfigError(
        f"unknown feature store {url!r}; use 'embedded', 'embedded:///abs/path.sqlite', 'memory' "
        "or 'redis://HOST:PORT/DB'"
    )

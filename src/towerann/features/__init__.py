"""User features at request time: static features + offline history + real-time session events.

`open_store(url)` picks a backend by URL (parsed by `towerann.storeurl`):
  "embedded"                    in-process, persisted to `path` (SQLite) or memory-only if no path
  "embedded:///abs/path.sqlite" in-process, persisted to that file
  "memory"                      in-process, nothing persisted
  "redis://host:port/db"        a Redis server shared by several serving processes
"""

from __future__ import annotations

from pathlib import Path

from towerann.config import FeaturesConfig
from towerann.errors import ConfigError
from towerann.features.base import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    Event,
    FeatureStore,
    UserFeatures,
)
from towerann.storeurl import parse_store_url

__all__ = ["Event", "FeatureStore", "UserFeatures", "open_configured_store", "open_store"]


def open_store(url: str = "embedded", *, path: str | Path | None = None, max_events: int = DEFAULT_MAX_EVENTS,
               ttl_s: float = DEFAULT_TTL_S, prefix: str = "towerann:") -> FeatureStore:
    """Open the feature store that `url` names; a bad url raises ConfigError."""
    u = parse_store_url(url)
    if u.is_redis:
        from towerann.features.redis_store import RedisFeatureStore

        if path is not None:
            raise ConfigError("--path is for the embedded store; a Redis store keeps its data in the server")
        return RedisFeatureStore(u.url, max_events=max_events, ttl_s=ttl_s, prefix=prefix)
    from towerann.features.embedded import EmbeddedFeatureStore

    if u.scheme == "memory" and path is not None:
        raise ConfigError("feature store 'memory' keeps nothing on disk; drop --path or use 'embedded'")
    if u.path is not None:
        if path is not None and Path(path) != Path(u.path):
            raise ConfigError(f"feature store url {u.url!r} and path {str(path)!r} disagree; give one of them")
        path = u.path
    return EmbeddedFeatureStore(path, max_events=max_events, ttl_s=ttl_s)


def open_configured_store(cfg: FeaturesConfig) -> FeatureStore:
    """The store a deployment's [features] section names, with every [features] setting: its path
    (embedded only), the request-path deadlines (Redis) and the session cap (embedded)."""
    u = parse_store_url(cfg.store)
    if u.is_redis:
        from towerann.features.redis_store import RedisFeatureStore

        return RedisFeatureStore(u.url, max_events=cfg.max_events, ttl_s=cfg.ttl_s, timeout_s=cfg.timeout_ms / 1e3,
                                 write_timeout_s=cfg.write_timeout_ms / 1e3, retry_s=cfg.retry_s)
    from towerann.features.embedded import EmbeddedFeatureStore

    path = cfg.path if cfg.store == "embedded" else u.path  # "memory": None
    return EmbeddedFeatureStore(path, max_events=cfg.max_events, ttl_s=cfg.ttl_s,
                                max_session_users=cfg.max_session_users)

"""User features at request time: static features + offline history + real-time session events.

`open_store(url)` picks a backend by URL (parsed by `towerann.storeurl`):
  "embedded"                    in-process, persisted to `path` (SQLite) or memory-only if no path
  "embedded:///abs/path.sqlite" in-process, persisted to that file
  "memory"                      in-process, nothing persisted
  "redis://host:port/db"        a Redis server shared by several serving processes
  "feast:/path/to/feature_repo" static features from a Feast repo's online store, sessions in one of the
                                above (the repo's towerann.toml says which; towerann.features.feast_store)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from towerann.config import FeaturesConfig
from towerann.errors import ConfigError
from towerann.features.store import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_TTL_S,
    Event,
    FeatureStore,
    UserFeatures,
)
from towerann.storeurl import parse_store_url

__all__ = ["Event", "FeatureStore", "UserFeatures", "open_configured_store", "open_store"]


def open_store(
    url: str = "embedded",
    *,
    path: str | Path | None = None,
    max_events: int = DEFAULT_MAX_EVENTS,
    ttl_s: float = DEFAULT_TTL_S,
    prefix: str = "towerann:",
) -> FeatureStore:
    """Open the feature store that `url` names; a bad url raises ConfigError."""
    if url.startswith("feast:"):
        return _open_feast(
            url, lambda sessions: open_store(sessions, path=path, max_events=max_events, ttl_s=ttl_s, prefix=prefix)
        )
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
    if cfg.store.startswith("feast:"):
        from dataclasses import replace

        return _open_feast(cfg.store, lambda sessions: open_configured_store(replace(cfg, store=sessions)))
    u = parse_store_url(cfg.store)
    if u.is_redis:
        from towerann.features.redis_store import RedisFeatureStore

        return RedisFeatureStore(
            u.url,
            max_events=cfg.max_events,
            ttl_s=cfg.ttl_s,
            timeout_s=cfg.timeout_ms / 1e3,
            write_timeout_s=cfg.write_timeout_ms / 1e3,
            retry_s=cfg.retry_s,
        )
    from towerann.features.embedded import EmbeddedFeatureStore

    path = cfg.path if cfg.store == "embedded" else u.path  # "memory": None
    return EmbeddedFeatureStore(
        path,
        max_events=cfg.max_events,
        ttl_s=cfg.ttl_s,
        max_session_users=cfg.max_session_users,
        session_memory_mb=cfg.session_memory_mb,
    )


def _open_feast(url: str, open_sessions: Callable[[str], FeatureStore]) -> FeatureStore:
    """feast:PATH -> a FeastFeatureStore over the repo, its sessions in the store its towerann.toml names."""
    from towerann.features.feast_store import FeastFeatureStore, read_mapping

    repo = Path(url[len("feast:") :]).expanduser()
    if not (repo / "feature_store.yaml").is_file():
        raise ConfigError(f"{url}: no feature_store.yaml there; give the path of a Feast feature repository")
    m = read_mapping(repo)
    sessions = open_sessions(m.get("sessions", "embedded"))
    try:
        return FeastFeatureStore(
            repo, sessions, m["features"], entity=m.get("entity", "user_id"), entity_type=m.get("entity_type", "str")
        )
    except BaseException:
        sessions.close()
        raise

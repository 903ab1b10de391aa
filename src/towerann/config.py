"""One TOML file configures a deployment; every setting has a default that works after `towerann demo`.

    [serve]    host, port, workers (processes sharing the port; 0 = one per core when the feature store
               can be shared across processes (Redis), else 1), max_k, max_body_bytes, and the limits on what
               one unauthenticated request may make the server keep: max_id_length (user, item and event-type
               ids), max_items_per_write, max_clock_skew_s (an event's ts may lie at most this far ahead of
               the server's clock; one older than [features] ttl_s is refused too, it would be expired on arrival),
               log_format ("text" or "json": one JSON object per log line), access_log (one line per request),
               grpc_port (gRPC beside HTTP, the same read path, limits and token: docs/operations.md; 0 = off)
    [paths]    model (a model directory), index (a bundle root with CURRENT, or one bundle directory),
               data (the dataset whose catalog `towerann refresh` re-embeds)
    [features] store ("embedded" | "memory" | "redis://HOST:PORT/DB"), path, max_events, ttl_s,
               purge_every_s (how often a server reclaims expired sessions; 0 = never),
               max_session_users (the embedded store keeps the sessions of at most this many users, dropping
               the least recently active), timeout_ms (deadline of a feature read on the request path: past
               it, the request is answered without the user's features, `degraded: true`), write_timeout_ms
               (deadline of storing a click; past it the click gets 503), retry_s (after a failure, a network
               store is not tried again for this long: requests answer at once, degraded or 503)
    [freshness] delta_path (SQLite delta log, default inside the [paths] index root; with a redis feature store
               the log is a stream in that Redis instead),
               token_file (bearer token for writes; env TOWERANN_API_TOKEN wins), poll_s (how often the
               server checks CURRENT for a new bundle; 0 = never), min_recall (a new bundle's recall@100
               vs exact search on sample user queries must reach this, or it is refused),
               refresh_every_s (the schedule of `towerann refresh`: rebuild every N seconds; 0 = once),
               timeout_ms (deadline of one delta-log call to Redis; past it the item write gets 503),
               tail_ms (with several workers: how often each one reads the delta log for the writes the
               others acknowledged; a write is searchable on every worker within about this long),
               allow_volatile (serve even when the delta log's Redis does not append-only-log its writes,
               so a crash of Redis can lose acknowledged writes; default false: refuse to start),
               rebuild_on_drift (when no re-tune restores a bundle's recall target, the server rebuilds the
               bundle, as `towerann refresh` does, if it can: a bundle with a model and a [paths] data dataset)
    [filters]  attributes (catalog columns besides category that requests may filter on, e.g.
               ["brand", "market", "in_stock"]: strings or booleans; `towerann embed` stores them per item
               as int32 codes with a JSON vocabulary, item writes may carry them)
    [monitor]  sample (the share of live requests replayed with exact search off the request path, for the
               online recall monitor; 0 = off), threshold (a bundle whose recall@k vs exact search falls
               under it is marked unhealthy in /readyz details, which stays 200, and logged; 0 = never),
               queue (samples waiting to be scored; when full, a drawn sample is dropped and counted),
               max_busy (the share of time exact searches may take: 0.005; past it samples are dropped),
               reservoir (live query vectors kept, with their filter and k but never a user id, for re-tuning:
               reservoir sampling over the sampled requests; 0 = none), reservoir_max_age_s (a kept query older
               than this is dropped), reservoir_save_s (how often the reservoir is written under the [paths]
               index root, ROOT/live_queries/; also on shutdown; 0 = on shutdown only)
    [retune]   the live re-tune (serving.retune_loop): enabled, samples (N: the last N unfiltered samples of the
               served version are judged), confidence (a re-tune starts when the upper bound of their mean
               recall at this one-sided confidence is under the bundle's tuned target), max_p99_ms (the p99 of
               one search at the new setting, on held-out live queries, must be within it), holdout (the share of
               the reservoir held out for that check), min_queries (reservoir queries a re-tune needs), margin
               (tuned to target + margin, checked at the target), cooldown_s (after a refused or failed re-tune,
               none starts for this long), keep (versions kept when the re-tune publishes one)

Command-line flags override the file (`Config.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towerann.errors import ConfigError

DEMO_DIR = "towerann-demo"
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # as towerann.index.base checks it (a file name there)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 0  # `towerann serve` processes on the port; 0 = the machine's cores if the store allows, else 1
    max_k: int = 1000
    max_body_bytes: int = 65536
    max_id_length: int = 256  # characters of a user_id, item_id or event type
    max_items_per_write: int = 1000  # rows of one POST /v1/items
    max_clock_skew_s: float = 300.0  # an event's ts may be at most this far in the future
    log_format: str = "text"  # the server's log lines on stderr: "text" or "json" (one JSON object per line)
    access_log: bool = True  # one INFO line per request (logger towerann.access)
    grpc_port: int = 0  # the gRPC transport (server.grpc_server) beside HTTP on this port; 0 = off


@dataclass(frozen=True)
class PathsConfig:
    model: str = f"{DEMO_DIR}/models/demo"  # only needed to build a bundle; a bundle carries its own model copy
    index: str = f"{DEMO_DIR}/indexes"
    data: str = f"{DEMO_DIR}/data"


@dataclass(frozen=True)
class FeaturesConfig:
    store: str = "embedded"
    path: str = f"{DEMO_DIR}/features.sqlite"
    max_events: int = 50
    ttl_s: float = 86400.0
    purge_every_s: float = 3600.0  # how often a server reclaims expired sessions (0 = never)
    max_session_users: int = 1_000_000  # embedded store: sessions kept, least recently active dropped first
    # embedded store: the sessions' memory, all told (~1M one-click sessions or ~80k of 50 events in 1 GiB)
    session_memory_mb: float = 1024.0
    timeout_ms: float = 100.0  # feature read deadline on the request path (then: degraded answer)
    write_timeout_ms: float = 1000.0  # click write deadline (then: 503)
    retry_s: float = 1.0  # a network store that failed is not tried again for this long


@dataclass(frozen=True)
class FreshnessConfig:
    delta_path: str = ""  # "": delta.sqlite inside the [paths] index root (towerann-demo/indexes/delta.sqlite)
    token_file: str = ""
    poll_s: float = 2.0
    min_recall: float = 0.8
    refresh_every_s: float = 0.0  # `towerann refresh` repeats this often (e.g. 3600: hourly); 0 = once
    timeout_ms: float = 1000.0  # deadline of one delta-log call to Redis (then: 503)
    tail_ms: float = 50.0  # several workers: each reads the others' writes from the delta log this often
    allow_volatile: bool = False  # serve with a delta log in a Redis without appendonly (warn, don't refuse)
    # bind the index root to the configured delta log although the root's previous log may hold writes
    # newer than the bundle (freshness.log_binding refuses that switch otherwise)
    adopt_log: bool = False
    # when no re-tune restores the served bundle's recall target, rebuild it in the server (a refresh) if it can
    rebuild_on_drift: bool = False


@dataclass(frozen=True)
class FiltersConfig:
    attributes: tuple[str, ...] = ()  # filterable catalog columns besides category


@dataclass(frozen=True)
class MonitorConfig:
    sample: float = 0.01  # share of requests replayed with exact search (serving.monitor); 0 = off
    threshold: float = 0.9  # recall@k under this marks the bundle unhealthy in /readyz details; 0 = never
    queue: int = 64  # samples waiting for the monitor's thread; a full queue drops (and counts) new ones
    # share of the time the monitor may spend on exact searches: after one taking t s it takes no sample for
    # t / max_busy - t s (dropped as "busy"). At 10M items a sample scans 5 GB and costs ~0.2 s; 1% of traffic
    # scored unbounded raised a 50 rps server's p99 from 19 to 75 ms.
    max_busy: float = 0.005
    # live query vectors kept for re-tuning (reservoir sampling over the sampled requests; their filter and k
    # with them, never a user id), under the [paths] index root in live_queries/; 0 = none
    reservoir: int = 2000
    reservoir_max_age_s: float = 86400.0  # a kept query older than this is dropped
    reservoir_save_s: float = 300.0  # how often the reservoir is written (and on shutdown); 0 = on shutdown only


@dataclass(frozen=True)
class RetuneConfig:
    """The live re-tune (serving.retune_loop): when the online recall of the served version is measurably
    under its tuned target, tune its search settings again on the live-query reservoir, check them on a
    held-out part, apply them without a reload and publish them as a new version."""

    enabled: bool = True
    samples: int = 500  # N: the last N unfiltered monitor samples of the served version are judged
    confidence: float = 0.95  # one-sided: the upper bound of the mean recall at this confidence < target: re-tune
    max_p99_ms: float = 10.0  # one search at the new setting, p99 over the held-out queries, must be within it
    holdout: float = 0.3  # share of the reservoir held out to check the new setting (recall and p99)
    min_queries: int = 200  # reservoir queries a re-tune needs
    margin: float = 0.01  # tuned to target + margin on the tuning part, checked at the target on the held-out part
    cooldown_s: float = 3600.0  # after a refused or failed re-tune, none starts for this long
    keep: int = 3  # snapshot versions kept when a re-tune publishes one


@dataclass(frozen=True)
class Config:
    serve: ServeConfig = field(default_factory=ServeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    freshness: FreshnessConfig = field(default_factory=FreshnessConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    retune: RetuneConfig = field(default_factory=RetuneConfig)

    def api_token(self) -> str | None:
        """The bearer token for write endpoints: env TOWERANN_API_TOKEN, else [freshness] token_file."""
        import os

        token = os.environ.get("TOWERANN_API_TOKEN", "").strip()
        if token:
            return token
        if self.freshness.token_file:
            path = Path(self.freshness.token_file)
            if not path.is_file():
                raise ConfigError(f"[freshness] token_file {path}: file not found")
            token = path.read_text().strip()
            if not token:
                raise ConfigError(f"[freshness] token_file {path} is empty")
            return token
        return None

    def with_overrides(self, **flags: Any) -> Config:
        """Replace settings by flag values given as section_key=value (None = not given)."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in flags.items():
            if value is None:
                continue
            section, _, key = name.partition("_")
            if section not in sections or key not in {f.name for f in dataclasses.fields(sections[section])}:
                raise ConfigError(f"unknown setting {name!r}")
            sections[section] = _build(
                type(sections[section]), {**dataclasses.asdict(sections[section]), key: value}, section, "flags"
            )
        return Config(**sections)


def _check_type(value: Any, want: type, where: str) -> Any:
    if want is tuple:  # a list of names
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: expected a list of names, got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: names appear twice in {list(value)}")
        return tuple(value)
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f"{where}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{source}: unknown key [{section}] {key!r}; known keys: {', '.join(types)}")
        want = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple}[str(types[key])]
        kwargs[key] = _check_type(value, want, f"{source}: [{section}] {key}")
    obj = cls(**kwargs)
    for key in (
        "port",
        "max_k",
        "max_body_bytes",
        "max_events",
        "max_id_length",
        "max_items_per_write",
        "max_session_users",
        "queue",
        "samples",
        "min_queries",
        "keep",
    ):
        if hasattr(obj, key) and getattr(obj, key) < (0 if key == "port" else 1):
            raise ConfigError(f"{source}: [{section}] {key} must be positive, got {getattr(obj, key)}")
    if getattr(obj, "log_format", "text") not in ("text", "json"):
        raise ConfigError(f"{source}: [{section}] log_format must be 'text' or 'json', got {obj.log_format!r}")
    if not 0 <= getattr(obj, "grpc_port", 0) <= 65535:
        raise ConfigError(f"{source}: [{section}] grpc_port must be a port number, or 0 (no gRPC)")
    if getattr(obj, "workers", 0) < 0:
        raise ConfigError(f"{source}: [{section}] workers must be >= 0 (0 = one per core)")
    for key in ("timeout_ms", "write_timeout_ms", "tail_ms"):
        if hasattr(obj, key) and not getattr(obj, key) > 0:
            raise ConfigError(f"{source}: [{section}] {key} must be a positive number of milliseconds")
    if getattr(obj, "retry_s", 0.0) < 0 or getattr(obj, "max_clock_skew_s", 0.0) < 0:
        raise ConfigError(f"{source}: [{section}] retry_s and max_clock_skew_s must be >= 0")
    if getattr(obj, "ttl_s", 1.0) <= 0:
        raise ConfigError(f"{source}: [{section}] ttl_s must be positive")
    if getattr(obj, "poll_s", 0.0) < 0 or not 0.0 <= getattr(obj, "min_recall", 0.0) <= 1.0:
        raise ConfigError(f"{source}: [{section}] poll_s must be >= 0 and min_recall in [0, 1]")
    if getattr(obj, "session_memory_mb", 1.0) <= 0:
        raise ConfigError(f"{source}: [{section}] session_memory_mb must be positive")
    if getattr(obj, "purge_every_s", 0.0) < 0:
        raise ConfigError(f"{source}: [{section}] purge_every_s must be >= 0 (0 = never purge)")
    bad = [a for a in getattr(obj, "attributes", ()) if not ATTRIBUTE_NAME.match(a) or a in ("category", "categories")]
    if bad:
        raise ConfigError(
            f"{source}: [{section}] attributes {bad}: use 1-32 characters a-z, 0-9, _ starting with "
            "a letter (category is always filterable: leave it out)"
        )
    if isinstance(obj, MonitorConfig) and not 0.0 < obj.max_busy <= 1.0:
        raise ConfigError(f"{source}: [{section}] max_busy must be in (0, 1], got {obj.max_busy}")
    if isinstance(obj, MonitorConfig) and not (0.0 <= obj.sample <= 1.0 and 0.0 <= obj.threshold <= 1.0):
        raise ConfigError(
            f"{source}: [{section}] sample and threshold must be in [0, 1], got {obj.sample} and {obj.threshold}"
        )
    if isinstance(obj, MonitorConfig) and (
        obj.reservoir < 0 or not obj.reservoir_max_age_s > 0 or obj.reservoir_save_s < 0
    ):
        raise ConfigError(
            f"{source}: [{section}] reservoir must be >= 0 (0 = none), reservoir_max_age_s > 0 and "
            "reservoir_save_s >= 0 (0 = on shutdown only)"
        )
    if isinstance(obj, RetuneConfig):
        if not (0.5 <= obj.confidence < 1.0 and 0.0 < obj.holdout < 1.0 and 0.0 <= obj.margin < 0.5):
            raise ConfigError(
                f"{source}: [{section}] confidence must be in [0.5, 1), holdout in (0, 1) and margin in [0, 0.5), "
                f"got {obj.confidence}, {obj.holdout} and {obj.margin}"
            )
        if not obj.max_p99_ms > 0 or obj.cooldown_s < 0:
            raise ConfigError(f"{source}: [{section}] max_p99_ms must be positive and cooldown_s >= 0")
    if getattr(obj, "refresh_every_s", 0.0) < 0:
        raise ConfigError(f"{source}: [{section}] refresh_every_s must be >= 0 (0 = refresh once)")
    return obj


def load_config(path: str | Path | None = None) -> Config:
    """Read a TOML config file (None: all defaults). Unknown keys or wrong types raise ConfigError."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; create it or drop --config to use the defaults")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    sections: dict[str, Any] = {}
    classes = {
        "serve": ServeConfig,
        "paths": PathsConfig,
        "features": FeaturesConfig,
        "freshness": FreshnessConfig,
        "filters": FiltersConfig,
        "monitor": MonitorConfig,
        "retune": RetuneConfig,
    }
    for name, values in data.items():
        if name not in classes:
            raise ConfigError(f"{path}: unknown section [{name}]; known sections: {', '.join(classes)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {name!r} must be a [{name}] table")
        sections[name] = _build(classes[name], values, name, str(path))
    return Config(**sections)

"""One TOML file configures a deployment; every setting has a default that works after `towerann demo`.

    [serve]    host, port, max_k, max_body_bytes
    [paths]    model (a model directory), index (a bundle root with CURRENT, or one bundle directory)
    [features] store ("embedded" | "memory" | "redis://HOST:PORT/DB"), path, max_events, ttl_s

Command-line flags override the file (`Config.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towerann.errors import ConfigError

DEMO_DIR = "towerann-demo"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_k: int = 1000
    max_body_bytes: int = 65536


@dataclass(frozen=True)
class PathsConfig:
    model: str = f"{DEMO_DIR}/models/demo"  # only needed to build a bundle; a bundle carries its own model copy
    index: str = f"{DEMO_DIR}/indexes"


@dataclass(frozen=True)
class FeaturesConfig:
    store: str = "embedded"
    path: str = f"{DEMO_DIR}/features.sqlite"
    max_events: int = 50
    ttl_s: float = 86400.0


@dataclass(frozen=True)
class Config:
    serve: ServeConfig = field(default_factory=ServeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)

    def with_overrides(self, **flags: Any) -> "Config":
        """Replace settings by flag values given as section_key=value (None = not given)."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in flags.items():
            if value is None:
                continue
            section, _, key = name.partition("_")
            if section not in sections or key not in {f.name for f in dataclasses.fields(sections[section])}:
                raise ConfigError(f"unknown setting {name!r}")
            sections[section] = _build(type(sections[section]), {**dataclasses.asdict(sections[section]), key: value},
                                       section, "flags")
        return Config(**sections)


def _check_type(value: Any, want: type, where: str) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f"{where}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{source}: unknown key [{section}] {key!r}; known keys: {', '.join(types)}")
        want = {"str": str, "int": int, "float": float}[str(types[key])]
        kwargs[key] = _check_type(value, want, f"{source}: [{section}] {key}")
    obj = cls(**kwargs)
    for key in ("port", "max_k", "max_body_bytes", "max_events"):
        if hasattr(obj, key) and getattr(obj, key) < (0 if key == "port" else 1):
            raise ConfigError(f"{source}: [{section}] {key} must be positive, got {getattr(obj, key)}")
    if getattr(obj, "ttl_s", 1.0) <= 0:
        raise ConfigError(f"{source}: [{section}] ttl_s must be positive")
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
    classes = {"serve": ServeConfig, "paths": PathsConfig, "features": FeaturesConfig}
    for name, values in data.items():
        if name not in classes:
            raise ConfigError(f"{path}: unknown section [{name}]; known sections: {', '.join(classes)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {name!r} must be a [{name}] table")
        sections[name] = _build(classes[name], values, name, str(path))
    return Config(**sections)

"""How many processes `towerann serve` starts, and which stores it refuses to share between them."""

from __future__ import annotations

import pytest

from towerann.config import Config, FeaturesConfig, ServeConfig, load_config
from towerann.errors import ConfigError
from towerann.server.workers import machine_cores, resolve_workers


def cfg(workers: int, store: str) -> Config:
    return Config(serve=ServeConfig(workers=workers), features=FeaturesConfig(store=store))


def test_by_default_one_worker_per_core_on_redis_and_one_on_a_process_local_store() -> None:
    assert resolve_workers(cfg(0, "redis://127.0.0.1:6379/0")) == machine_cores()
    assert resolve_workers(cfg(0, "embedded")) == 1
    assert resolve_workers(cfg(0, "memory")) == 1


def test_several_workers_on_a_process_local_store_are_refused_naming_redis() -> None:
    for store in ("embedded", "memory"):
        with pytest.raises(ConfigError, match=r"--workers 3: .*redis://"):
            resolve_workers(cfg(3, store))
    assert resolve_workers(cfg(3, "redis://127.0.0.1:6379/0")) == 3
    assert resolve_workers(cfg(1, "embedded")) == 1


def test_workers_and_tail_ms_are_checked(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[serve]\nworkers = 4\n[freshness]\ntail_ms = 20\n")
    c = load_config(path)
    assert c.serve.workers == 4 and c.freshness.tail_ms == 20.0
    assert c.with_overrides(serve_workers=2).serve.workers == 2
    for bad in ("[serve]\nworkers = -1\n", "[freshness]\ntail_ms = 0\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(path)

"""Config: TOML file -> frozen dataclasses, defaults that fit `towerann demo`, flags override."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from towerann.config import Config, load_config
from towerann.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "towerann.toml"
    p.write_text(text)
    return p


def test_defaults_point_at_the_demo() -> None:
    cfg = load_config(None)
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.max_k, cfg.serve.max_body_bytes) == (
        "127.0.0.1",
        8000,
        1000,
        65536,
    )
    assert cfg.paths.index == "towerann-demo/indexes"
    assert (cfg.features.store, cfg.features.path) == ("embedded", "towerann-demo/features.sqlite")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.serve.port = 1  # type: ignore[misc]


def test_file_values_and_flag_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, '[serve]\nport = 9000\n[features]\nstore = "redis://127.0.0.1:6379/0"\nttl_s = 60\n')
    )
    assert cfg.serve.port == 9000 and cfg.serve.max_k == 1000
    assert cfg.features.store.startswith("redis://") and cfg.features.ttl_s == 60.0
    over = cfg.with_overrides(serve_port=9100, paths_index="x/indexes", features_store=None)
    assert (over.serve.port, over.paths.index, over.features.store) == (9100, "x/indexes", cfg.features.store)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[serve]\nprot = 1\n", "'prot'"),
        ("[srv]\nport = 1\n", "[srv]"),
        ('[serve]\nport = "8000"\n', "[serve] port: expected int"),
        ("[serve]\nmax_k = true\n", "[serve] max_k: expected int"),
        ("[features]\nmax_events = 0\n", "max_events must be positive"),
        ("[serve\n", "not valid TOML"),
        ("serve = 3\n", "[serve] table"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert words in str(e.value)


def test_missing_file_and_unknown_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="serve_nope"):
        Config().with_overrides(serve_nope=1)
    with pytest.raises(ConfigError, match="expected int"):
        Config().with_overrides(serve_port="80")


def test_limits_deadlines_and_durability_settings(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert (cfg.serve.max_id_length, cfg.serve.max_items_per_write, cfg.serve.max_clock_skew_s) == (256, 1000, 300.0)
    assert (cfg.features.timeout_ms, cfg.features.write_timeout_ms, cfg.features.retry_s) == (100.0, 1000.0, 1.0)
    assert cfg.features.max_session_users == 1_000_000
    assert (cfg.freshness.timeout_ms, cfg.freshness.allow_volatile) == (1000.0, False)
    cfg = load_config(
        write(
            tmp_path,
            "[features]\ntimeout_ms = 50\nmax_session_users = 10\n"
            "[freshness]\nallow_volatile = true\n[serve]\nmax_id_length = 64\n",
        )
    )
    assert (
        cfg.features.timeout_ms,
        cfg.features.max_session_users,
        cfg.freshness.allow_volatile,
        cfg.serve.max_id_length,
    ) == (50.0, 10, True, 64)


@pytest.mark.parametrize(
    "text, words",
    [
        ('[freshness]\nallow_volatile = "yes"\n', "expected true or false"),
        ("[freshness]\nallow_volatile = 1\n", "expected true or false"),
        ("[features]\ntimeout_ms = 0\n", "timeout_ms must be a positive"),
        ("[features]\nwrite_timeout_ms = -5\n", "write_timeout_ms must be a positive"),
        ("[features]\ntimeout_ms = nan\n", "finite"),
        ("[features]\nmax_session_users = 0\n", "max_session_users must be positive"),
        ("[serve]\nmax_id_length = 0\n", "max_id_length must be positive"),
        ("[serve]\nmax_clock_skew_s = -1\n", "max_clock_skew_s must be >= 0"),
        ("[features]\nretry_s = inf\n", "finite"),
    ],
)
def test_bad_limits_are_refused(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert words in str(e.value)

"""Fixtures for the HTTP tests: one small real bundle (synth 2k items, dim-32 model, 2 epochs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig
from towerann.server.server import ServerHandle, start_background


@pytest.fixture(scope="session")
def bundle_paths(serving_bundle: dict[str, Path]) -> dict[str, Path]:
    """The session's one small bundle (tests/conftest.py serving_bundle), under the name these tests use."""
    return serving_bundle


def make_config(paths: dict[str, Path], store: str = "memory", store_path: str = "", **serve: object) -> Config:
    from towerann.config import ServeConfig

    # adopt_log: many tests serve the session's one bundle root, each with a log of its own (a switch that
    # log_binding refuses in production unless told; test_delta_log_identity.py checks the refusal)
    return Config(
        serve=ServeConfig(**serve),
        paths=PathsConfig(index=str(paths["index"]), model=str(paths["model"])),
        features=FeaturesConfig(store=store, path=store_path),
        freshness=FreshnessConfig(adopt_log=True),
    )


@pytest.fixture(scope="module")
def server(bundle_paths: dict[str, Path]) -> Iterator[ServerHandle]:
    """A real uvicorn server in a thread on a free loopback port, memory store, max_k=200, 1 KiB bodies."""
    handle = start_background(make_config(bundle_paths, max_k=200, max_body_bytes=1024))
    yield handle
    handle.stop()

"""`towerann refresh` on a schedule: [freshness] refresh_every_s repeats the rebuild; bad values are refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from towerann.config import load_config
from towerann.errors import ConfigError
from towerann.freshness.publish import publish_bundle
from towerann.index.snapshot import list_versions


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "towerann.toml"
    path.write_text(body)
    return path


def test_refresh_every_s_is_read_and_checked(tmp_path: Path) -> None:
    assert load_config(_toml(tmp_path, "[freshness]\nrefresh_every_s = 3600\n")).freshness.refresh_every_s == 3600.0
    assert load_config(None).freshness.refresh_every_s == 0.0  # default: refresh once
    with pytest.raises(ConfigError, match="refresh_every_s"):
        load_config(_toml(tmp_path, "[freshness]\nrefresh_every_s = -1\n"))


def test_refresh_repeats_on_the_configured_schedule(tmp_path: Path, serving_bundle: dict[str, Path]) -> None:
    paths = serving_bundle
    root = tmp_path / "indexes"
    publish_bundle(root, paths["model"], paths["vectors"], kind="exact")
    toml = _toml(
        tmp_path,
        f'[paths]\nindex = "{root}"\ndata = "{paths["data"]}"\n'
        f'[freshness]\ndelta_path = "{tmp_path / "delta.sqlite"}"\nrefresh_every_s = 0.2\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "towerann.cli", "refresh", "--config", str(toml), "--kind", "exact", "--keep", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(list_versions(root)) < 3:  # the initial bundle + two scheduled rebuilds
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no second scheduled refresh within 90 s"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""A delta log the server cannot use is one line and exit 2 from `towerann serve`, as a corrupt bundle
or feature store is (it was a 24-line traceback and exit 1): a file of random bytes, a delta_path that
is a directory, a logged entry whose payload is not JSON."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from towerann.freshness.deltalog import SQLiteDeltaLog
from towerann.server.commands import main as serve


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def _a_directory(path: Path) -> None:
    path.mkdir()


def _payload_not_json(path: Path) -> None:
    log = SQLiteDeltaLog(path)
    log.append("available", "1", {"available": False})
    log.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO delta (ts, op, item_id, payload) VALUES (0, 'available', '2', '{not json')")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "spoil, says",
    [
        (_random_bytes, "not a usable delta log"),
        (_a_directory, "is a directory"),
        (_payload_not_json, "entry 2 is not JSON"),
    ],
)
def test_an_unusable_delta_log_is_one_line_and_exit_2(
    spoil: Callable[[Path], None],
    says: str,
    bundle_paths: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root, ignore=shutil.ignore_patterns("root.json", "delta.sqlite*"))
    spoil(tmp_path / "delta.sqlite")
    cfg = tmp_path / "towerann.toml"
    cfg.write_text(
        f'[paths]\nindex = "{root}"\n[features]\nstore = "memory"\n'
        f'[freshness]\ndelta_path = "{tmp_path / "delta.sqlite"}"\n'
    )
    assert serve(["serve", "--config", str(cfg), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "Traceback" not in err[0], err

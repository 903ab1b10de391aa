"""Artifact writes reach the disk before they are published: every file and directory of an
artifact is flushed (fsync) before the rename, and the rename itself after it. A power cut cannot be
staged here, so the flushes are watched: os.fsync is wrapped (and still called) to record the path of
every descriptor it flushes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from towerann import artifacts


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(artifacts.os, "fsync", fsync)
    return seen


def test_an_artifact_directory_is_flushed_file_by_file_then_renamed_and_the_rename_flushed(
    tmp_path: Path, flushed: list[str]
) -> None:
    target = tmp_path / "out" / "bundle"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "a.npy").write_bytes(b"a" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
        staged = str(tmp)
    assert (target / "sub" / "b.json").read_text() == "{}" and not Path(staged).exists()
    want_before = {f"{staged}/a.npy", f"{staged}/sub/b.json", f"{staged}/sub", staged}
    assert want_before <= set(flushed), flushed  # every file and directory, while still under the temp name
    assert flushed[-1] == str(target.parent)  # then the directory holding the rename
    assert max(flushed.index(p) for p in want_before) < len(flushed) - 1


def test_a_json_file_is_flushed_before_its_rename_and_the_rename_after(tmp_path: Path, flushed: list[str]) -> None:
    path = tmp_path / "manifest.json"
    artifacts.write_json_atomic(path, {"version": 1})
    assert path.read_text().strip().startswith("{") and len(flushed) == 2
    assert Path(flushed[0]).parent == tmp_path and flushed[0] != str(path)  # the temp file, before the rename
    assert flushed[1] == str(tmp_path)

"""A bundle's manifest is covered by a checksum of itself: its own fields (the delta log cut-off
`delta_seq`, the category names) edited by hand are refused at load - one line, exit 2 from
`towerann serve` - instead of loading silently (a raised delta_seq would skip replaying acknowledged
writes; a renamed category would answer filters for another one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from towerann.errors import ArtifactError
from towerann.index.snapshot import resolve
from towerann.server.commands import main as serve
from towerann.serving.bundle import RetrievalBundle


@pytest.mark.parametrize("edit", ["delta_seq", "category"])
def test_a_hand_edited_bundle_manifest_is_refused(
    edit: str, bundle_paths: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "indexes"
    shutil.copytree(bundle_paths["index"], root)
    version = resolve(root)
    RetrievalBundle.load(version)  # as published: loads
    path = version / "manifest.json"
    m = json.loads(path.read_text())
    if edit == "delta_seq":
        m["bundle"]["delta_seq"] = 9
    else:
        m["bundle"]["category_names"][1] = "renamed"
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        RetrievalBundle.load(version)
    assert serve(["serve", "--index", str(root), "--store", "memory", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its own checksum" in err[0], err

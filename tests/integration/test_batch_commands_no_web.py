"""The batch commands never load the web stack: `towerann index build` and `towerann refresh` run in a
fresh interpreter without fastapi, starlette or uvicorn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def paths(bundle_paths: dict[str, Path]) -> dict[str, Path]:
    return bundle_paths


def test_index_build_and_refresh_do_not_load_the_web_stack(paths: dict[str, Path], tmp_path: Path) -> None:
    """`towerann index build` and `towerann refresh` run for real, in a fresh interpreter, without
    importing fastapi, starlette or uvicorn (a batch job must not need the server's dependencies)."""
    script = f"""
import json, sys
from towerann.cli import main
rc_build = main(["index", "build", "--vectors", {str(paths["vectors"])!r}, "--kind", "hnsw",
                 "--out", {str(tmp_path / "snapshots")!r}])
rc_refresh = main(["refresh", "--data", {str(paths["data"])!r}, "--model", {str(paths["model"])!r},
                   "--index", {str(tmp_path / "bundles" / "indexes")!r}, "--kind", "exact"])
web = sorted(m for m in ("fastapi", "starlette", "uvicorn") if m in sys.modules)
print(json.dumps({{"rc": [rc_build, rc_refresh], "web": web}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": [0, 0], "web": []}, result
    assert (tmp_path / "snapshots" / "CURRENT").is_file() and (tmp_path / "bundles" / "indexes" / "CURRENT").is_file()
    # the check itself can fail: the server's module does load them
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, towerann.server.server; print('uvicorn' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.strip() == "True"

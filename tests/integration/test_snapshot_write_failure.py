"""A snapshot that cannot be written (the disk fills, a file-size limit) publishes nothing: the old
snapshot stays current and loadable, no half-written version is left, and the CLI says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from towerann.data.vectors_dir import write_vectors
from towerann.index import load
from towerann.index.snapshot import current_version, list_versions

D, N = 32, 4000


def test_a_snapshot_that_cannot_be_written_leaves_the_current_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((N, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    vectors = write_vectors(
        tmp_path / "vectors",
        v,
        np.arange(N, dtype=np.int64),
        np.zeros(N, np.int32),
        np.ones(N, bool),
        ["a"],
        "tower-1",
        np.arange(N),
    )
    root = tmp_path / "indexes"
    build = [sys.executable, "-m", "towerann.cli", "index", "build", "--vectors", str(vectors), "--out", str(root)]
    subprocess.run(build + ["--kind", "exact"], check=True, capture_output=True, timeout=120)
    good = current_version(root)
    # The HNSW files are ~1 MB; a 600 KB file-size limit makes the write fail midway, as a full disk
    # would. SIGXFSZ is ignored so the write returns EFBIG instead of killing the process.
    limited = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000)); "
        f"sys.argv = {['towerann', *build[3:], '--kind', 'hnsw']!r}; "
        "runpy.run_module('towerann.cli', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "nothing was published" in out.stderr, out.stderr
    assert current_version(root) == good and list_versions(root) == [good]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp directory left behind
    assert load(root).kind == "exact" and len(load(root)) == N

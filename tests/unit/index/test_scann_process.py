"""A ScaNN searcher in a helper process (index/scann_process.py), as a serving process loads one.

ScaNN's loader holds the GIL for its whole run (0.37-0.45 s at 1M items), which stalled every request
of a server during a hot swap; so a server loads its ScaNN searchers into helper processes. What the
helper must keep: the same answers as the in-process searcher on every search path (single and
batched, masked, the delta tier), its own process (it exits when the index is released, and a killed
one is started again on the next search), a clear error for assets it cannot load, a snapshot written
from it that loads again, and the server turning it on.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from towerann.errors import ArtifactError
from towerann.index import Filter, create
from towerann.index import scann as scann_backend
from towerann.index.snapshot import load_snapshot, publish

if importlib.util.find_spec("scann") is None:
    if os.environ.get("CI"):
        pytest.fail("scann is not installed; CI installs towerann[scann]", pytrace=False)
    pytest.skip("scann is not installed (pip install 'towerann[scann]')", allow_module_level=True)

D, N, NQ, K = 16, 6_000, 40, 50  # above ScaNN's brute-force size (2000): a tree and AH codes


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    ix = create("scann", D)
    ix.build(vectors, np.arange(N, dtype=np.int64) * 7, rng.integers(0, 5, N).astype(np.int32))
    return publish(ix, tmp_path_factory.mktemp("scann-proc"), "m"), rng.standard_normal((NQ, D)).astype(np.float32)


@pytest.fixture
def in_helper():
    scann_backend.load_in_helper_process(True)
    yield
    scann_backend.load_in_helper_process(False)


def _load(path: Path):
    ix = load_snapshot(path)
    ix.search_defaults["exact_below"] = 0  # masked searches take the library path, not brute force
    return ix


def _child_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a child that exited but was not reaped yet is a zombie: gone for this purpose
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_the_helper_answers_as_the_in_process_searcher(snapshot, in_helper):
    path, queries = snapshot
    scann_backend.load_in_helper_process(False)
    local = _load(path)
    scann_backend.load_in_helper_process(True)
    helper = _load(path)
    assert helper._searcher.pid not in (None, os.getpid())
    new = np.random.default_rng(9).standard_normal((30, D)).astype(np.float32)
    for ix in (local, helper):  # the delta tier beside the tree
        ix.add(new, np.arange(30, dtype=np.int64) + 10**6, np.full(30, 2, np.int32))
    for flt, params in [
        (None, {}),
        (None, {"leaves": 2, "reorder": 100}),
        (Filter(frozenset({1, 2})), {"filter_path": "post"}),
        (Filter(frozenset({4})), {"filter_path": "filtered", "leaves": 2}),
    ]:
        a = local.search(queries, K, filter=flt, params=params)
        b = helper.search(queries, K, filter=flt, params=params)
        assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores), (flt, params)
        for i in range(3):  # the single-query entry point
            one_a = local.search(queries[i : i + 1], K, filter=flt, params=params)
            one_b = helper.search(queries[i : i + 1], K, filter=flt, params=params)
            assert np.array_equal(one_a.ids, one_b.ids), (flt, params, i)


def test_the_helper_exits_when_released_and_a_killed_one_comes_back(snapshot, in_helper):
    path, queries = snapshot
    ix = _load(path)
    before = ix.search(queries, K).ids
    pid = ix._searcher.pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert np.array_equal(ix.search(queries, K).ids, before)  # started again, same answers
    again = ix._searcher.pid
    assert again != pid and _child_alive(again)
    ix.release_memory()
    assert not _child_alive(again) and ix._searcher.pid is None


def test_a_snapshot_written_from_a_helper_loads_again(snapshot, in_helper, tmp_path):
    path, queries = snapshot
    ix = _load(path)
    republished = publish(ix, tmp_path, "m")
    assert np.array_equal(_load(republished).search(queries, K).ids, ix.search(queries, K).ids)


def test_assets_the_helper_cannot_load_are_a_one_line_artifact_error(snapshot, in_helper, tmp_path):
    import shutil

    path, _ = snapshot
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "scann" / "serialized_partitioner.pb").write_bytes(b"not a partitioner")
    with pytest.raises(ArtifactError) as e:
        load_snapshot(broken, verify=False)  # past the checksums: what ScaNN itself makes of the file
    assert "ScaNN could not load it" in str(e.value) and "\n" not in str(e.value)


def test_a_serving_process_loads_scann_into_helpers(tmp_path):
    from towerann.config import Config, PathsConfig
    from towerann.server.wiring import open_service

    scann_backend.load_in_helper_process(False)
    try:
        with pytest.raises(ArtifactError):  # no bundle there; the switch is set before the load is tried
            open_service(Config(paths=PathsConfig(index=str(tmp_path / "none"))))
        assert scann_backend._load_in_helper_process
    finally:
        scann_backend.load_in_helper_process(False)

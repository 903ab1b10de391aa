"""In a serving process a loaded index's vectors get room for live adds when they load: the first add
after a load (a start, a hot swap) then writes into memory reserved off the request path instead of
copying the whole mapped file on the event loop (1M x 64-d ScaNN: 0.86 s with every request waiting)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from towerann.index import base, create, load
from towerann.index.snapshot import publish

N, D = 3000, 16
NO_SCANN = importlib.util.find_spec("scann") is None and not os.environ.get("CI")  # CI installs it: never skipped there
KINDS = ["exact", pytest.param("scann", marks=pytest.mark.skipif(NO_SCANN, reason="ScaNN is not installed"))]


@pytest.fixture
def serving() -> Iterator[None]:
    base.room_on_load(True)
    try:
        yield
    finally:
        base.room_on_load(False)


def _published(tmp_path: Path, kind: str) -> Path:
    v = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    ix = create(kind, D)
    ix.build(v / np.linalg.norm(v, axis=1, keepdims=True), np.arange(N))
    publish(ix, tmp_path, "m1")
    return tmp_path


def _add_some(ix: object) -> np.ndarray:
    new = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
    ix.add(new, np.arange(N, N + 20))  # type: ignore[attr-defined]
    return new


@pytest.mark.parametrize("kind", KINDS)
def test_a_serving_load_reserves_room_so_the_first_add_copies_nothing(tmp_path: Path, kind: str, serving) -> None:
    loaded = load(_published(tmp_path, kind))
    (vecs,) = loaded.buffers()
    assert vecs.flags.writeable and vecs.shape == (N, D)  # already in memory, not the mapped file
    where = vecs.ctypes.data
    new = _add_some(loaded)
    assert loaded.buffers()[0].ctypes.data == where  # written into the room: nothing was copied
    assert loaded.search(new, 1).ids[:, 0].tolist() == list(range(N, N + 20))  # and the items are found


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_load_maps_and_copies_only_when_it_grows(tmp_path: Path, kind: str) -> None:
    loaded = load(_published(tmp_path, kind))
    (vecs,) = loaded.buffers()
    assert not vecs.flags.writeable  # the snapshot's file, mapped
    _add_some(loaded)
    assert loaded.buffers()[0].flags.writeable and len(loaded) == N + 20


def test_no_room_when_the_vectors_would_crowd_memory(tmp_path: Path, monkeypatch, serving) -> None:
    root = _published(tmp_path, "exact")
    monkeypatch.setattr("towerann.index.base.available_memory_bytes", lambda: 3 * N * D * 4)  # under 4x them
    (vecs,) = load(root).buffers()
    assert not vecs.flags.writeable  # left mapped; the first add will copy them (and the log says so)


def test_room_is_copied_a_chunk_at_a_time_and_keeps_every_row(monkeypatch) -> None:
    monkeypatch.setattr(base, "ROOM_CHUNK_BYTES", 7 * D * 4)  # 7 rows a chunk: the last chunk is partial
    rows = np.arange(50 * D, dtype=np.float32).reshape(50, D)
    mapped = rows.copy()
    mapped.flags.writeable = False
    g = base.Growable(mapped)
    g.make_room(5)
    assert g.data.flags.writeable and np.array_equal(g.data, rows) and g.allocated_bytes == 55 * D * 4


def test_a_copy_loaded_only_to_be_searched_gets_no_room(tmp_path: Path, serving) -> None:
    """The live re-tune loads the served version again to tune it: never grown, so it stays mapped, while a
    load on another thread at the same time (a swap's) still gets its room."""
    import threading

    root = _published(tmp_path, "exact")
    other: list[np.ndarray] = []
    with base.without_room():
        (vecs,) = load(root).buffers()
        loader = threading.Thread(target=lambda: other.extend(load(root).buffers()))
        loader.start()
        loader.join()
    assert not vecs.flags.writeable and other[0].flags.writeable
    assert load(root).buffers()[0].flags.writeable  # and after the block, this thread's loads get room again

"""A loaded HNSW graph has room to grow: the first live add after a load (a start, a hot swap) writes into
buffers reserved at load time instead of reallocating and copying the whole graph on the event loop
(0.3-1.3 s at 1M items, measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.index import create, load
from towerann.index.snapshot import publish

N, D = 3000, 16


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_first_add_after_a_load_moves_no_buffer(tmp_path: Path) -> None:
    ix = create("hnsw", D, M=8, ef_construction=32)
    ix.build(_unit(N, 0), np.arange(N))
    publish(ix, tmp_path, "m1")
    loaded = load(tmp_path)
    where = [buf.ctypes.data for buf in loaded.buffers()]  # vectors, links
    new = _unit(20, 1)
    loaded.add(new, np.arange(N, N + 20))
    assert [buf.ctypes.data for buf in loaded.buffers()] == where  # written in place: nothing was copied
    assert len(loaded) == N + 20
    found = loaded.search(new, 1).ids[:, 0]
    assert (found == np.arange(N, N + 20)).mean() >= 0.9  # the added items are in the graph


def test_no_room_is_reserved_when_holding_the_graph_twice_would_crowd_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserve copies the graph once: beside a swap's two bundles that can be too much at 10M items."""
    ix = create("hnsw", D, M=8, ef_construction=32)
    ix.build(_unit(N, 0), np.arange(N))
    publish(ix, tmp_path, "m1")
    graph = sum(buf.nbytes for buf in ix.buffers())
    monkeypatch.setattr("towerann.index.hnsw.available_memory_bytes", lambda: 3 * graph)  # under 4x the graph
    loaded = load(tmp_path)
    where = [buf.ctypes.data for buf in loaded.buffers()]
    loaded.add(_unit(20, 1), np.arange(N, N + 20))
    assert [buf.ctypes.data for buf in loaded.buffers()] != where  # exactly full: the add had to move them

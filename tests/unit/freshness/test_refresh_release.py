"""Releasing a swapped-out bundle: its index pages go back to the kernel, but only once no request holds it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from towerann.freshness.publish import publish_bundle
from towerann.freshness.reload import release_when_unused
from towerann.index.base import release_pages
from towerann.serving.bundle import RetrievalBundle

PAGE = 4096


@pytest.fixture(scope="module")
def hnsw_root(serving_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:

    paths = serving_bundle
    root = tmp_path_factory.mktemp("hnsw-bundle")
    publish_bundle(root, paths["model"], paths["vectors"], kind="hnsw")
    return root


def test_release_pages_zeroes_whole_pages_inside_the_buffer_only() -> None:
    owner = np.ones(5 * PAGE, np.uint8)
    buf = owner[100 : 4 * PAGE + 50]  # starts and ends inside a page: those partial pages are not touched
    released = release_pages(buf)
    assert released > 0 and released % PAGE == 0
    assert released <= buf.nbytes
    assert int(buf.sum()) == buf.nbytes - released  # exactly the released bytes read as zero now
    assert buf[0] == 1 and buf[-1] == 1


def test_old_bundle_is_released_only_after_its_last_request_lets_go(hnsw_root: Path) -> None:
    old = RetrievalBundle.load(hnsw_root)
    buffers = old.index.buffers()
    assert len(buffers) == 2 and sum(b.nbytes for b in buffers) >= len(old.index) * 32 * 4  # vectors + graph
    q = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    before = old.index.search(q, 10).ids

    request = old  # a request still holds the bundle: nothing may be released under it
    assert release_when_unused(old, wait_s=0.05) == 0
    assert np.array_equal(old.index.search(q, 10).ids, before)
    del request
    index = old.index  # something kept the index alone: still nothing released
    assert release_when_unused(old, wait_s=0.05) == 0
    assert np.array_equal(index.search(q, 10).ids, before)
    del index

    held = threading.Event()
    let_go: dict[str, float] = {}

    def in_flight(bundle: RetrievalBundle) -> None:  # a request that finishes 0.2 s after the swap
        held.set()
        time.sleep(0.2)
        let_go["at"] = time.monotonic()
        del bundle

    t = threading.Thread(target=in_flight, args=(old,))
    t.start()
    held.wait()
    released = release_when_unused(old, wait_s=5.0)
    returned_at = time.monotonic()
    t.join()
    assert returned_at > let_go["at"], "released while a request still held the bundle"
    assert released >= 0.9 * sum(b.nbytes for b in buffers)
    assert not old.index.buffers()[0][PAGE:-PAGE].any()  # the vectors' pages are gone (read as zeros)
    del old  # the destructor frees what is left without touching the released pages


def test_indexes_without_c_buffers_release_nothing_and_keep_answering() -> None:
    from towerann.index import create

    index = create("exact", 8, "ip")
    index.build(np.eye(8, dtype=np.float32), np.arange(8))
    assert index.release_memory() == 0
    assert index.search(np.eye(8, dtype=np.float32)[:1], 1).ids[0, 0] == 0


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are a Linux feature")
def test_a_reload_runs_in_a_thread_of_its_own_at_a_lower_priority(hnsw_root: Path, tmp_path: Path) -> None:
    """Load and validation must yield the cores to request threads: the reload's thread is niced, the caller's
    is not."""
    from towerann.freshness.deltalog import open_delta_log
    from towerann.freshness.live import ItemWriter
    from towerann.freshness.reload import RELOAD_NICE, Reloader
    from towerann.serving.holder import BundleHolder

    delta = open_delta_log("embedded", path=tmp_path / "delta.sqlite")
    try:
        reloader = Reloader(ItemWriter(BundleHolder(), delta), hnsw_root)
        seen: dict[str, int] = {}
        reloader.add_listener(
            lambda outcome, info: seen.update(
                nice=os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), thread=threading.get_ident()
            )
        )
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        info = reloader.reload()
        assert info["outcome"] == "swapped", info
        assert seen["nice"] == max(mine, RELOAD_NICE) and seen["thread"] != threading.get_ident()
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller keeps its priority
    finally:
        delta.close()

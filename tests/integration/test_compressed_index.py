"""The compressed index (ivfpq): codes in RAM, full vectors in a file read only to re-rank.

Checked by effect, on the library path (a catalog big enough to train IVF-PQ, no filter):
- re-ranking from the file gives exactly the scores of re-ranking from memory (same bits);
- a cold search (the file's pages evicted from the page cache) returns what a warm one does, and the
  eviction really leaves the file's pages out of memory;
- a cold query reads its re-rank rows in at most one run of pages per probed list (slots are stored
  in list order), not a read per row;
- the memory the index reports as resident matches what loading it costs the process (RssAnon for
  the tables, the lists file's mapped pages for the codes, in a child process), on disk and in RAM,
  and an unfiltered search maps no per-entry id of faiss' lists;
- recall floors with and without re-ranking on the far-off-query catalog, against exact search;
- items added after a load live in the in-memory tier and are found and re-ranked from there;
- a snapshot of the layout before (faiss' lists with an id per entry, slots in insertion order, no
  lookup files) still loads and answers as the index it was saved from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from towerann.data.synth_vectors import far_off_catalog
from towerann.index import create
from towerann.index.ivfpq import IVFPQIndex
from towerann.index.snapshot import load_snapshot, publish
from towerann.index.tune import recall_at_k
from towerann.index.vecfile import MappedRows, resident_fraction

N, D, NQ, K = 20_000, 32, 100, 100


@pytest.fixture(scope="module")
def cat():
    return far_off_catalog(N, NQ, D, seed=3)


@pytest.fixture(scope="module")
def published(cat, tmp_path_factory):
    ix = create("ivfpq", D, nlist=128)  # nprobe 32 (the default) probes a quarter of the lists
    ix.build(cat.vectors, np.arange(N, dtype=np.int64) + 7)
    assert ix.describe().startswith("IVF"), ix.describe()  # the library, not the untrained fallback
    return ix, publish(ix, tmp_path_factory.mktemp("ivfpq"), "model-v1")


def _load(path: Path, rerank_from: str) -> IVFPQIndex:
    """The snapshot, loaded with its vectors on disk or read into RAM."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["build_params"]["rerank_from"] = rerank_from
    return IVFPQIndex.load(path, manifest)


def test_rerank_from_file_gives_exactly_the_in_memory_scores(cat, published):
    built, path = published
    on_disk, in_ram = _load(path, "disk"), _load(path, "memory")
    assert on_disk.rerank_vectors.on_disk and not in_ram.rerank_vectors.on_disk
    for q in (cat.queries, cat.queries[:1]):  # a batch, and one query (the parallel file reads)
        a, b, c = (ix.search(q, K) for ix in (on_disk, in_ram, built))
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.ids, c.ids)
        np.testing.assert_array_equal(a.scores, c.scores)
    # And those are the true inner products of the returned items.
    ids = a.ids[0]
    np.testing.assert_allclose(a.scores[0], cat.vectors[ids - 7] @ cat.queries[0], rtol=1e-5, atol=1e-6)


def test_a_cold_search_returns_what_a_warm_one_does(cat, published):
    _, path = published
    ix = _load(path, "disk")
    q = cat.queries[:5]
    warm = [ix.search(q[i : i + 1], K) for i in range(len(q))]
    vectors_file = path / "vectors.npy"
    assert resident_fraction(vectors_file) > 0.0  # the warm searches read some of it
    for i in range(len(q)):
        assert ix.evict_vectors()
        assert resident_fraction(vectors_file) == 0.0  # evicted: the next search reads from disk
        cold = ix.search(q[i : i + 1], K)
        np.testing.assert_array_equal(cold.ids, warm[i].ids)
        np.testing.assert_array_equal(cold.scores, warm[i].scores)
    assert ix.warm_vectors() and resident_fraction(vectors_file) == 1.0  # and back: every page cached
    np.testing.assert_array_equal(ix.search(q[:1], K).ids, warm[0].ids)
    assert not create("ivfpq", D).evict_vectors()  # nothing on disk: nothing to evict


_GROWTH = """
import json, re, sys
import numpy as np
import os
from towerann.index import Filter
from towerann.index.vecfile import resident_pages
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def file_rss(name):
    # {mapping: resident bytes} of this process' mappings of a file
    out, cur = {}, None
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            cur = line.split()[0] if line.rstrip().endswith(name) else None
        elif cur and line.startswith("Rss:"):
            out[cur] = int(line.split()[1]) * 1024
    return out
from towerann.index.ivfpq import IVFPQIndex  # libraries first: their own memory is not the index's
path, rerank_from = sys.argv[1], sys.argv[2]
manifest = json.load(open(path + "/manifest.json"))
manifest["build_params"]["rerank_from"] = rerank_from
warm_up = IVFPQIndex.load(path, manifest)  # first-use costs (lazy imports, the allocator's arenas)
lists = path + "/ivfpq_lists.bin"
fd = os.open(lists, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the file out of the page cache (nothing maps a page yet)
os.close(fd)
before, maps_before = rss_anon(), set(file_rss("ivfpq_lists.bin"))
ix = IVFPQIndex.load(path, manifest)  # the second copy, alive beside the first: what an index costs
growth = rss_anon() - before
(mine,) = set(file_rss("ivfpq_lists.bin")) - maps_before  # the second copy's mapping of the lists file
first, end = ix.lists_ids_pages()
q = np.ones((1, ix.dim), np.float32)
ix.search(q, 10, params={"nprobe": ix.nlist, "rerank": 0})  # every list scanned, unfiltered
scanned = file_rss("ivfpq_lists.bin")[mine]
ids_read = int(resident_pages(lists)[first:end].sum())  # ids pages read from disk by anyone
ix.search(q, 10, filter=Filter(categories=frozenset({1})), params={"nprobe": ix.nlist, "exact_below": 0})
m = ix.memory()
print(json.dumps({"growth": growth, "anon": m["anon_bytes"], "codes": m["mapped_bytes"], "scanned": scanned,
                  "ids_read": ids_read, "ids_read_filtered": int(resident_pages(lists)[first:end].sum())}))
"""


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """400k items with a category and an attribute of a few hundred values each (int16 codes): a
    memory growth (~3.5 MB of tables) well above the allocator's noise."""
    n, d = 400_000, 16
    rng = np.random.default_rng(5)
    ix = create("ivfpq", d, nlist=128, pq_m=4, train_sample=10_000)
    ix.build(
        rng.standard_normal((n, d), dtype=np.float32),
        np.arange(n, dtype=np.int64),
        categories=rng.integers(0, 1000, n),
        attributes={"brand": rng.integers(0, 300, n)},
    )
    return ix, publish(ix, tmp_path_factory.mktemp("ivfpq-400k"), "model-v1")


@pytest.mark.parametrize("rerank_from", ["disk", "memory"])
def test_reported_resident_bytes_match_the_process_memory_growth(bigger, rerank_from):
    """What the index reports against what the process grows by: the anonymous part (RssAnon: slot
    tables, centroids, page maps, vectors read into RAM) and the mapped PQ codes (the resident pages of
    the lists file's mapping after every list was scanned). An unfiltered scan maps the codes and
    nothing else of the lists file: faiss (store_pairs, no prefetch threads) reads no per-entry id; a
    filtered search's selector does read them."""
    ix, path = bigger
    n, d = ix.n_slots, ix.dim
    reported = ix.memory(as_loaded=True)
    assert (
        reported["resident_bytes"]
        == json.loads((path / "manifest.json").read_text())["backend_state"]["memory"]["resident_bytes"]
    )
    out = subprocess.run(
        [sys.executable, "-c", _GROWTH, str(path), rerank_from], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Measured with this layout on 600k items (a draft of this fixture; it now builds 400k): 2.404 MB grown
    # for 2.588 MB reported on disk, 40.81 for 40.98 in RAM.
    assert abs(r["growth"] - r["anon"]) <= 0.05 * r["anon"] + (256 << 10), r
    assert r["codes"] == n * 4 and r["codes"] <= r["scanned"] <= r["codes"] + (256 << 10), r  # the codes' pages
    assert r["ids_read"] == 0, r  # an unfiltered search read no id: faiss ran with store_pairs, no prefetch
    assert r["ids_read_filtered"] > 0, r  # the bitmap selector reads the ids of the lists it probes
    per_item = reported["resident_bytes_per_item_by_table"]
    assert per_item["pq_codes"] == 4 and per_item["categories"] == 2 and per_item["attr_brand"] == 2, per_item
    assert per_item["ids"] == per_item["lookup"] == 0 and per_item["flags"] == 0.25, per_item
    assert reported["resident_bytes_per_item"] < 4 + 2 + 2 + 0.25 + 0.5, reported  # no 8-byte id anywhere
    if rerank_from == "memory":
        assert r["growth"] > n * d * 4


# Measured (far-off catalog seed 3, 20k x 32, IVF128,PQ4x8, nprobe 32; faiss builds repeat exactly):
# recall@100 0.462 from the 4-byte codes alone, 0.826 re-ranking 400, 0.948 re-ranking 1000.
FLOORS = {0: 0.43, 400: 0.79, 1000: 0.92}


def test_recall_with_and_without_rerank(cat, published):
    built, _ = published
    truth = built.exact_search(cat.queries, K).ids
    recall = {r: recall_at_k(built.search(cat.queries, K, params={"rerank": r}).ids, truth) for r in FLOORS}
    assert all(recall[r] >= FLOORS[r] for r in FLOORS), recall
    assert recall[1000] > recall[0] + 0.3  # re-ranking is what wins the recall back


def test_items_added_after_a_load_stay_in_memory_and_are_reranked_from_there(cat, published):
    _, path = published
    ix = _load(path, "disk")
    disk_before = ix.memory()["disk_bytes"]
    new = cat.queries[:3] / np.linalg.norm(cat.queries[:3], axis=1, keepdims=True)
    ix.add(new, np.array([10**9, 10**9 + 1, 10**9 + 2]))
    assert ix.rerank_vectors.fresh.n == 3 and ix.rerank_vectors.n_main == N  # the file was not copied into RAM
    assert ix.memory()["disk_bytes"] == disk_before
    res = ix.search(cat.queries[:3], K)
    np.testing.assert_array_equal(res.ids[:, 0], [10**9, 10**9 + 1, 10**9 + 2])
    np.testing.assert_allclose(res.scores[:, 0], (new * cat.queries[:3]).sum(1), rtol=1e-5)
    # Saved again, the fresh tier joins the file.
    again = load_snapshot(publish(ix, path.parent, "model-v1"))
    assert again.rerank_vectors.fresh.n == 0 and again.rerank_vectors.n_main == N + 3
    np.testing.assert_array_equal(again.search(cat.queries[:3], K).ids, res.ids)


def test_a_cold_query_reads_its_rerank_rows_in_runs_bounded_by_nprobe(cat, published, monkeypatch):
    """Slots are stored in inverted-list order, so the rows a query re-ranks sit in its probed lists'
    ranges of the file: at most one read (a prefetched run of pages) per probed list, where a read per
    row (page) was the cost before."""
    _, path = published
    ix = _load(path, "disk")
    runs: list[int] = []
    pages: list[int] = []
    prefetch = MappedRows.prefetch

    def counted(self, slots):
        first = (self._offset + np.asarray(slots) * self._row_bytes) // 4096
        pages.append(len(np.unique(first)))
        runs.append(prefetch(self, slots))
        return runs[-1]

    monkeypatch.setattr(MappedRows, "prefetch", counted)
    nprobe = 32
    for i in range(10):
        assert ix.evict_vectors()
        ix.search(cat.queries[i : i + 1], K, params={"nprobe": nprobe, "rerank": 1000})
    assert len(runs) == 10 and max(runs) <= nprobe, runs
    assert sum(pages) >= 4 * sum(runs), (pages, runs)  # many pages per read
    runs.clear()
    ix.search(cat.queries[9:10], K, params={"nprobe": nprobe, "rerank": 1000})  # the last one again
    assert runs == [0]  # warm: every page read since the eviction, no system call


def _as_old_layout(ix, source: Path, directory: Path) -> None:
    """Write `source` (a published ivfpq snapshot of the freshly built `ix`) into `directory` as the
    layout before: faiss' own lists with an id per entry, vectors and tables in insertion order (int32
    categories), no lookup files, no layout field."""
    import faiss

    from towerann.artifacts import sha256_file, write_manifest

    manifest = json.loads((source / "manifest.json").read_text())
    np.save(directory / "slot_ids.npy", ix.slot_ids)
    np.save(directory / "slot_categories.npy", ix.slot_categories.astype(np.int32))
    np.save(directory / "slot_alive.npy", ix.slot_alive)
    np.save(directory / "slot_available.npy", ix.slot_returnable)
    np.save(directory / "vectors.npy", ix.rerank_vectors.main)
    faiss.write_index(ix._ix, str(directory / "ivfpq.faiss"))
    manifest.pop("slot_lookup")
    manifest.pop("checksum", None)
    manifest["build_params"].pop("rerank_dtype")
    manifest["backend_state"] = {"vectors": "vectors.npy", "file": "ivfpq.faiss", "memory": {}}
    manifest["checksums"] = {f.name: sha256_file(f) for f in sorted(directory.iterdir())}
    write_manifest(directory / "manifest.json", manifest)


def test_a_snapshot_of_the_layout_before_still_loads(cat, published, tmp_path):
    built, path = published
    old = tmp_path / "old"
    (old / "v1").mkdir(parents=True)
    _as_old_layout(built, path, old / "v1")
    ix = load_snapshot(old / "v1")
    a, b = ix.search(cat.queries, K), built.search(cat.queries, K)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    ix.remove(b.ids[0, :5])
    assert not np.isin(ix.search(cat.queries[:1], K).ids, b.ids[0, :5]).any()
    again = load_snapshot(publish(ix, tmp_path / "new", "model-v1"))  # saved again: the new layout
    assert (again.memory()["mapped_bytes"]) == again.n_slots * again.build_params["pq_m"]
    np.testing.assert_array_equal(again.search(cat.queries, K).ids, ix.search(cat.queries, K).ids)

"""The slot tables of every backend (towerann.index.base): narrow codes, flag bitsets, the mapped
slot -> id table and id -> slot lookup, checked against plain numpy and through an index's writes."""

from __future__ import annotations

import numpy as np
import pytest

from towerann.index import Filter, create
from towerann.index.base import BitSet, Codes, Mask, code_dtype
from towerann.index.snapshot import load_snapshot, publish


def test_bitset_matches_a_bool_array_through_extends_and_sets():
    rng = np.random.default_rng(0)
    want = np.zeros(0, bool)
    bits = BitSet()
    for size in (3, 5, 8, 13, 0, 64, 7):  # partial bytes on both sides of each extend
        part = rng.random(size) < 0.5
        bits.extend(part)
        want = np.concatenate([want, part])
        assert bits.n == len(want) and np.array_equal(bits.bools(), want)
    slots = rng.choice(len(want), 30, replace=False)
    for value in (False, True, False):
        bits.set(slots, value)
        want[slots] = value
        assert np.array_equal(bits.bools(), want) and np.array_equal(bits.get(slots), want[slots])
    assert bits.count() == int(want.sum())
    assert np.array_equal(bits.packed, np.packbits(want, bitorder="little"))  # faiss' bitmap order, zero tail
    big = rng.random(100_003) < 0.3
    assert np.array_equal(BitSet.from_bools(big, chunk=4096).bools(), big)


def test_codes_are_as_narrow_as_their_values_and_widen_when_a_value_does_not_fit():
    assert code_dtype(-1, 127) == np.int8 and code_dtype(-1, 128) == np.int16 and code_dtype(-1, 40_000) == np.int32
    c = Codes(np.array([-1, 3, 99]))
    assert c.data.dtype == np.int8
    c.extend(np.array([200]))
    assert c.data.dtype == np.int16 and c.data.tolist() == [-1, 3, 99, 200]
    c.assign(np.array([0]), np.array([70_000]))
    assert c.data.dtype == np.int32 and c.data.tolist() == [70_000, 3, 99, 200]


def test_a_packed_mask_is_the_same_mask():
    rng = np.random.default_rng(1)
    bits = rng.random(1001) < 0.4
    a, b = Mask(bits=bits), Mask.from_packed(np.packbits(bits, bitorder="little"), len(bits))
    assert a.n == b.n == 1001 and a.count == b.count == int(bits.sum())
    assert np.array_equal(a.bits, b.bits) and np.array_equal(a.idx, b.idx) and np.array_equal(a.packed, b.packed)


@pytest.fixture
def catalog():
    rng = np.random.default_rng(3)
    n, d = 3000, 8
    return {
        "vectors": rng.standard_normal((n, d)).astype(np.float32),
        "ids": rng.permutation(10 * n)[:n].astype(np.int64) + 5,
        "categories": rng.integers(0, 300, n),  # int16 codes
        "brand": rng.integers(0, 50, n),  # int8 codes
    }


def test_a_loaded_index_maps_ids_and_lookup_and_keeps_writes_in_memory(catalog, tmp_path):
    ix = create("exact", 8)
    ix.build(catalog["vectors"], catalog["ids"], catalog["categories"], attributes={"brand": catalog["brand"]})
    path = publish(ix, tmp_path, "m")
    assert sorted(p.name for p in path.glob("slot_lookup_*.npy")) == ["slot_lookup_ids.npy", "slot_lookup_slots.npy"]
    lo = load_snapshot(path)
    assert lo.slot_categories.dtype == np.int16 and lo.slot_attributes["brand"].dtype == np.int8
    assert lo.slot_table_mapped_bytes() == 3000 * 8 + 3000 * 16  # ids, then the (id, slot) pairs
    # Only categories (2 B), brand (1 B) and 2 flag bits per slot are the process's own.
    assert lo.slot_table_bytes() == 3000 * 3 + 2 * 375
    ids = catalog["ids"]
    hit, slots = lo.aligned_slots(np.concatenate([ids[:5], [1]]))
    assert hit.tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(lo.slot_ids[slots], ids[:5])
    # Writes after the load: a removal, an upsert (the old slot dies), a new item, a re-added item.
    lo.remove(ids[:2])
    lo.add(catalog["vectors"][2:4] * 2, ids[2:4], categories=np.array([1000, 1000]))  # int16 still fits
    lo.add(catalog["vectors"][:1], np.array([10**12]), categories=np.array([70_000]))  # widens to int32
    lo.add(catalog["vectors"][:1], ids[:1])  # removed, back
    assert lo.slot_categories.dtype == np.int32
    assert len(lo) == 3000 - 2 + 1 + 1 and lo.n_slots == 3000 + 4
    assert ids[1] not in lo and ids[0] in lo and 10**12 in lo
    assert lo.slots_of(ids[2:4]).tolist() == [3000, 3001]
    # Rows of the mapped table and of the in-memory one, in any shape; slot -1 (padding) gives id -1.
    probe = np.array([[0, -1], [3001, 3002]])
    assert lo.ids_of_slots(probe).tolist() == [[int(lo.slot_ids[0]), -1], [int(ids[3]), 10**12]]
    assert lo.slot_ids[3002] == 10**12 and len(lo.slot_ids) == lo.n_slots
    np.testing.assert_array_equal(lo.search(catalog["vectors"][2:4] * 2, 1).ids[:, 0], ids[2:4])
    res = lo.search(catalog["vectors"][:50], 10, filter=Filter(categories=frozenset({1000, 70_000})))
    assert set(res.ids[res.ids >= 0].tolist()) == {int(ids[2]), int(ids[3]), 10**12}
    # Saved again and loaded, everything comes back from the files.
    again = load_snapshot(publish(lo, tmp_path, "m"))
    for probe in (ids[:6], np.array([10**12, 1])):
        np.testing.assert_array_equal(again.aligned_slots(probe)[0], lo.aligned_slots(probe)[0])
    np.testing.assert_array_equal(
        again.search(catalog["vectors"][:20], 10).ids, lo.search(catalog["vectors"][:20], 10).ids
    )
    np.testing.assert_array_equal(again.slot_returnable, lo.slot_returnable)


def test_a_snapshot_without_lookup_files_sorts_its_lookup_on_load(catalog, tmp_path):
    """Snapshots written before the lookup files (and with int32 categories) still load."""
    import json

    from towerann.artifacts import sha256_file, write_manifest

    ix = create("exact", 8)
    ix.build(catalog["vectors"], catalog["ids"], catalog["categories"])
    path = publish(ix, tmp_path, "m")
    for name in ("slot_lookup_ids.npy", "slot_lookup_slots.npy"):
        (path / name).unlink()
    np.save(path / "slot_categories.npy", np.load(path / "slot_categories.npy").astype(np.int32))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("slot_lookup")
    manifest.pop("checksum", None)
    manifest["checksums"] = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.name != "manifest.json"}
    write_manifest(path / "manifest.json", manifest)
    lo = load_snapshot(path)
    assert lo.slot_categories.dtype == np.int16
    assert lo.slots_of(catalog["ids"][:3]).tolist() == sorted(lo.slots_of(catalog["ids"][:3]).tolist())
    np.testing.assert_array_equal(lo.search(catalog["vectors"][:5], 3).ids, ix.search(catalog["vectors"][:5], 3).ids)

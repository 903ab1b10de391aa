"""Snapshots: versions, the CURRENT pointer, pruning, rollback, manifest contents, refusal of bad ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from towerann.artifacts import write_manifest
from towerann.errors import ArtifactError, IndexIncompatible
from towerann.index import Filter, create, load
from towerann.index.snapshot import (
    CURRENT,
    current_version,
    list_versions,
    load_snapshot,
    publish,
    read_checked_manifest,
    rollback,
)

D = 8


def _index(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ix = create("exact", D)
    ix.build(v, np.arange(n) + 100, categories=np.arange(n) % 4, available=np.arange(n) % 5 != 0)
    return ix, v


def test_publish_writes_manifest_and_current(tmp_path):
    ix, _ = _index()
    path = publish(ix, tmp_path, "m1", extra={"note": "hello"})
    assert (tmp_path / CURRENT).read_text().strip() == path.name == current_version(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    assert m["kind"] == "index" and m["format_version"] == 1 and m["backend"] == "exact"
    assert m["model_version"] == "m1" and m["dim"] == D and m["metric"] == "ip" and m["count"] == 40
    assert m["note"] == "hello" and m["created_at"] and m["description"] == "Flat"
    assert set(m["checksums"]) == {p.name for p in path.iterdir() if p.name != "manifest.json"}
    assert m["search_defaults"] == {"exact_below": 16384, "filter_path": "auto", "filter_plan": []}


def test_loaded_index_filters_like_the_saved_one(tmp_path):
    ix, v = _index()
    ix.remove([101])
    publish(ix, tmp_path, "m1")
    loaded = load(tmp_path)
    f = Filter(categories=frozenset({1, 2}))
    for flt in (None, f):
        a, b = ix.search(v[:5], 30, filter=flt), loaded.search(v[:5], 30, filter=flt)
        np.testing.assert_array_equal(a.ids, b.ids)
    ids = loaded.search(v[:5], 40).ids
    assert 101 not in ids and not np.isin(ids, np.arange(0, 40, 5) + 100).any()  # unavailable stay hidden
    assert len(loaded) == 39 and loaded.manifest["model_version"] == "m1"


def test_prune_keeps_newest_and_rollback_moves_current(tmp_path):
    ix, _ = _index()
    paths = [publish(ix, tmp_path, "m1", keep=2) for _ in range(4)]
    assert list_versions(tmp_path) == [p.name for p in paths[-2:]]
    assert rollback(tmp_path) == paths[-2].name == current_version(tmp_path)
    with pytest.raises(ArtifactError, match="no version older"):
        rollback(tmp_path)
    publish(ix, tmp_path, "m1", keep=1)  # the new version becomes current; older ones go
    assert list_versions(tmp_path) == [current_version(tmp_path)]


def test_prune_never_deletes_current(tmp_path):
    ix, _ = _index()
    a = publish(ix, tmp_path, "m1")
    b = publish(ix, tmp_path, "m1")
    rollback(tmp_path)
    assert current_version(tmp_path) == a.name
    from towerann.index.snapshot import prune

    assert prune(tmp_path, keep=1) == []  # the newest (b) is kept, and a is current
    assert set(list_versions(tmp_path)) == {a.name, b.name}


def test_failed_publish_leaves_nothing(tmp_path):
    ix, _ = _index()
    first = publish(ix, tmp_path, "m1")
    with pytest.raises(ArtifactError, match="overwrite"):
        publish(ix, tmp_path, "m1", extra={"backend": "other"})
    assert list_versions(tmp_path) == [first.name] and current_version(tmp_path) == first.name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_snapshots_are_refused(tmp_path):
    ix, _ = _index()
    path = publish(ix, tmp_path, "m1")
    with pytest.raises(IndexIncompatible, match="item tower 'm1'"):
        load_snapshot(tmp_path, expected_model_version="m2")
    m = json.loads((path / "manifest.json").read_text())
    write_manifest(path / "manifest.json", {**m, "metric": "l2"})
    with pytest.raises(IndexIncompatible, match="metric"):
        read_checked_manifest(path)
    write_manifest(path / "manifest.json", {**m, "format_version": 7})
    with pytest.raises(ArtifactError, match="format_version"):
        load(path)
    (path / "manifest.json").write_text(json.dumps({**m, "dim": m["dim"] + 1}))  # edited by hand: no valid checksum
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(path)
    with pytest.raises(ArtifactError, match="neither an index snapshot"):
        load(tmp_path / "nowhere")
    (tmp_path / CURRENT).write_text("20990101T000000.000000Z-abcdef\n")
    with pytest.raises(ArtifactError, match="not a complete snapshot"):
        load(tmp_path)

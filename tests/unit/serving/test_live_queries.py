"""The reservoir of live queries (serving.monitor.LiveQueries) and its files (index.retune): bounded,
a uniform sample of what it was offered, recent (old queries expire and free their slots), tied to one
user tower, written whole under the root (per writer, merged on read) and read back checked; nothing but
a vector, k, the filter values and a second is ever stored. The judge's bound (retune_loop.upper_bound)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from towerann.config import load_config
from towerann.errors import ArtifactError, ConfigError
from towerann.index.retune import (
    LIVE_QUERIES,
    RECORD_KEYS,
    read_live_queries,
    read_live_writer,
    write_live_queries,
)
from towerann.serving.monitor import LiveQueries
from towerann.serving.retune_loop import upper_bound

DIM = 8
T0 = 1_700_000_000.0


def vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[0] = float(i)  # the query's number, readable back from the stored vector
    return v


def stored_numbers(r: LiveQueries) -> list[int]:
    vectors, _ = r.contents(now=T0)
    return sorted(int(x) for x in vectors[:, 0])


def test_the_reservoir_is_bounded_and_a_uniform_sample_of_what_it_was_offered() -> None:
    size, offered, runs = 20, 200, 300
    hits = np.zeros(offered)
    for seed in range(runs):
        r = LiveQueries(size, seed=seed)
        for i in range(offered):
            r.offer("m1", vec(i), 10, None, now=T0)
        kept = stored_numbers(r)
        assert len(r) == size and len(kept) == size == len(set(kept))
        hits[kept] += 1
    # each query is kept with probability size / offered = 0.1: the first and the last tenth alike
    # (Algorithm R; keeping the first `size` would give the first ones 1.0 and the rest 0)
    first, last = hits[: offered // 10].mean() / runs, hits[-offered // 10 :].mean() / runs
    assert 0.07 < first < 0.13 and 0.07 < last < 0.13, (first, last)


def test_old_queries_expire_and_free_their_slots_for_the_next_ones() -> None:
    r = LiveQueries(10, max_age_s=60.0, seed=0)
    for i in range(10):
        r.offer("m1", vec(i), 10, None, now=T0)
    for i in range(10, 15):
        r.offer("m1", vec(i), 10, None, now=T0 + 50)  # the reservoir is full: each kept with p = 10 / n
    vectors, records = r.contents(now=T0 + 100)  # the first ten are 100 s old now: dropped
    assert all(rec["ts"] == T0 + 50 for rec in records) and len(vectors) == len(records) < 10
    left = len(records)
    for i in range(100, 100 + 10 - left):  # the freed slots go to the next queries, each one kept
        r.offer("m1", vec(i), 10, None, now=T0 + 101)
    assert len(r) == 10 and stored_numbers(r)[-(10 - left) :] == list(range(100, 100 + 10 - left))


def test_a_query_of_another_model_empties_the_reservoir() -> None:
    r = LiveQueries(5, seed=0)
    for i in range(5):
        r.offer("m1", vec(i), 10, None, now=T0)
    r.offer("m2", vec(99), 10, None, now=T0)
    assert len(r) == 1 and r.model_version == "m2" and stored_numbers(r) == [99]


def test_saved_whole_and_read_back_by_a_restart(tmp_path: Path) -> None:
    r = LiveQueries(50, root=tmp_path, seed=0)
    for i in range(30):
        r.offer("m1", vec(i), 5 + i % 3, {"categories": ["shoes"]} if i % 2 else None)
    assert r.save()
    assert not r.save()  # nothing changed: nothing written
    directory = tmp_path / LIVE_QUERIES / "main"
    assert sorted(p.name for p in directory.iterdir()) == ["filters.json", "manifest.json", "queries.npy"]
    assert not [p for p in (tmp_path / LIVE_QUERIES).iterdir() if p.name.startswith(".")]  # no temp left

    again = LiveQueries(50, root=tmp_path, seed=1)
    assert again.load("m1") == 30 and again.seen == 30
    vectors, records = again.contents()
    assert sorted(int(x) for x in vectors[:, 0]) == list(range(30))
    assert {json.dumps(rec["filter"]) for rec in records} == {"null", '{"categories": ["shoes"]}'}
    assert LiveQueries(50, root=tmp_path).load("another-model") == 0  # queries of another tower: not loaded


def test_records_hold_nothing_but_k_filter_and_ts(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="user_id"):
        write_live_queries(
            tmp_path, "main", np.zeros((1, DIM)), [{"k": 5, "filter": None, "ts": 1, "user_id": "u"}], {}
        )
    assert not (tmp_path / LIVE_QUERIES / "main").exists()
    write_live_queries(
        tmp_path, "main", np.zeros((1, DIM)), [{"k": 5, "filter": None, "ts": 1}], {"model_version": "m"}
    )
    directory = tmp_path / LIVE_QUERIES / "main"
    records = json.loads((directory / "filters.json").read_text())
    records[0]["user_id"] = "u"  # slipped in by hand, checksum fixed up: still refused on read
    (directory / "filters.json").write_text(json.dumps(records))
    m = json.loads((directory / "manifest.json").read_text())
    from towerann.artifacts import sha256_file, write_manifest

    m["checksums"]["filters.json"] = sha256_file(directory / "filters.json")
    m.pop("manifest_sha256")
    write_manifest(directory / "manifest.json", m)
    with pytest.raises(ArtifactError, match="do not match"):
        read_live_writer(directory)
    assert set(RECORD_KEYS) == {"k", "filter", "ts"}


def test_a_corrupted_file_is_refused_on_read_and_skipped_on_load(tmp_path: Path) -> None:
    r = LiveQueries(10, root=tmp_path)
    for i in range(5):
        r.offer("m1", vec(i), 10, None)
    r.save()
    path = tmp_path / LIVE_QUERIES / "main" / "queries.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_live_queries(tmp_path)
    assert LiveQueries(10, root=tmp_path).load("m1") == 0  # a server starts with an empty one instead


def test_writers_are_merged_on_read_and_each_restarts_from_its_own(tmp_path: Path) -> None:
    for w, base in (("worker-0", 0), ("worker-1", 100)):
        r = LiveQueries(10, root=tmp_path, writer=w)
        for i in range(4):
            r.offer("m1", vec(base + i), 10, None)
        r.save()
    other = LiveQueries(10, root=tmp_path, writer="x")
    other.offer("m0", vec(500), 10, None)  # another model's: left out of a merge for m1
    other.save()
    merged = read_live_queries(tmp_path, "m1")
    assert sorted(int(x) for x in merged.vectors[:, 0]) == [0, 1, 2, 3, 100, 101, 102, 103]
    assert merged.writers == ("worker-0", "worker-1")
    w0 = LiveQueries(10, root=tmp_path, writer="worker-0")
    assert w0.load("m1") == 4 and stored_numbers(w0) == [0, 1, 2, 3]  # not the other worker's
    w0.offer("m1", vec(7), 10, None)
    assert sorted(int(x) for x in w0.merged("m1")[:, 0]) == [0, 1, 2, 3, 7, 100, 101, 102, 103]


def test_upper_bound_is_the_one_sided_normal_bound_of_the_mean() -> None:
    values = [0.8, 0.9, 1.0, 0.7, 0.9, 0.8]
    mean, bound = upper_bound(values, 0.95)
    assert mean == pytest.approx(0.85)
    assert bound == pytest.approx(0.85 + 1.6448536 * statistics.stdev(values) / len(values) ** 0.5, rel=1e-6)
    assert upper_bound(values, 0.99)[1] > bound > mean


def test_reservoir_and_retune_settings_are_checked(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert (cfg.monitor.reservoir, cfg.retune.enabled, cfg.retune.samples, cfg.freshness.rebuild_on_drift) == (
        2000,
        True,
        500,
        False,
    )
    for text, words in (
        ("[monitor]\nreservoir = -1\n", "reservoir must be >= 0"),
        ("[retune]\nconfidence = 1.0\n", "confidence must be in"),
        ("[retune]\nsamples = 0\n", "samples must be positive"),
        ("[retune]\nmax_p99_ms = 0\n", "max_p99_ms must be positive"),
        ("[retune]\nbogus = 1\n", "'bogus'"),
    ):
        path = tmp_path / "t.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=words):
            load_config(path)

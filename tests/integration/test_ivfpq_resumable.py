"""`index build --kind ivfpq --resume-dir`: an ivfpq built part by part (index/ivfpq_resumable.py).

The part-by-part build must give the index an in-memory build gives (the same files, byte for byte),
and a build killed with SIGKILL between two steps must go on from the step after the last one done,
not start again, and still give that index.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from towerann.cli import main
from towerann.data.synth_vectors import FarOffParts, far_off_catalog
from towerann.data.vectors_dir import write_vectors
from towerann.errors import ConfigError
from towerann.index import create, ivfpq_resumable
from towerann.index.ivfpq_resumable import ResumableBuild
from towerann.index.snapshot import current_version, load_snapshot, publish, read_checked_manifest
from towerann.index.tune import recall_at_k

N, D, PART = 12_000, 32, 3000  # 4 parts
PARAMS: dict[str, Any] = {"nlist": 64, "pq_m": 8, "train_sample": 5000, "rerank_dtype": "float16"}
ARGS = [f"--param={k}={v}" for k, v in PARAMS.items()]


@pytest.fixture(autouse=True)
def _small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The assembly writes the vector files through slot-range buckets: ~1000 rows each here, a dozen."""
    monkeypatch.setattr(ivfpq_resumable, "BUCKET_BYTES", 72_000)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    cat = far_off_catalog(N, 50, D, seed=3)
    rng = np.random.default_rng(3)
    vdir = tmp_path_factory.mktemp("resumable") / "vectors"
    write_vectors(
        vdir,
        cat.vectors,
        np.arange(N, dtype=np.int64),
        (cat.clusters % 20 + 1).astype(np.int32),  # code 0 is "unknown"
        rng.random(N) > 0.05,
        ["<unknown>", *(f"c{i}" for i in range(20))],
        "m-test",
        np.arange(1000, 1000 + N, dtype=np.int64),
        part_size=PART,
    )
    return vdir, cat.queries


def built(vdir: Path, root: Path, *extra: str) -> dict[str, str]:
    """`index build --kind ivfpq` (+ extra flags) into root; the published version's file checksums."""
    assert main(["index", "build", "--vectors", str(vdir), "--kind", "ivfpq", "--out", str(root), *ARGS, *extra]) == 0
    version = root / current_version(root)
    checksums: dict[str, str] = read_checked_manifest(version)["checksums"]
    return checksums


@pytest.fixture(scope="module")
def in_memory_root(catalog: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("in-memory") / "indexes"
    built(catalog[0], root)
    return root


@pytest.fixture(scope="module")
def in_memory(in_memory_root: Path) -> dict[str, str]:
    checksums: dict[str, str] = read_checked_manifest(in_memory_root / current_version(in_memory_root))["checksums"]
    return checksums


def test_the_part_by_part_build_writes_the_in_memory_builds_files(catalog, in_memory, tmp_path):
    vdir, queries = catalog
    root = tmp_path / "indexes"
    assert built(vdir, root, "--resume-dir", str(tmp_path / "work")) == in_memory
    assert {"ivfpq_lists.bin", "vectors.npy", "rerank.npy", "slot_ids.npy", "slot_categories.npy"} <= set(in_memory)
    # published by hard links to the assembled files, not by a second copy of them
    for name in ("ivfpq_lists.bin", "vectors.npy", "rerank.npy"):
        published = root / current_version(root) / name
        assert published.stat().st_ino == (tmp_path / "work" / "assembled" / name).stat().st_ino, name
    index = load_snapshot(root)
    assert index.kind == "ivfpq" and len(index) == N and index.describe().startswith(f"IVF{PARAMS['nlist']},PQ8")
    # and it searches: the IVF-PQ walk with re-ranking finds most of exact search's top 10
    got, truth = index.search(queries, 10).ids, index.exact_search(queries, 10).ids
    assert np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)]) >= 0.8


def test_a_killed_build_goes_on_from_its_last_finished_step(catalog, in_memory, tmp_path, caplog):
    vdir, _ = catalog
    work = tmp_path / "work"
    # A real SIGKILL, at a known point: right after part 1's encoding is recorded done.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from towerann.index.ivfpq_resumable import ResumableBuild

        def step(name):
            if name == "encode 1":
                os.kill(os.getpid(), signal.SIGKILL)

        ResumableBuild(Path({str(vdir)!r}), Path({str(work)!r}), {PARAMS!r}).run(on_step=step, progress=False)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = json.loads((work / "progress.json").read_text())
    assert progress["trained"] and progress["encoded"] == [0, 1] and not progress["assembled"]
    (work / ".part-00002.lists.npy.tmp.npy").write_bytes(b"half a file")  # as a kill mid-write leaves

    steps: list[str] = []
    with caplog.at_level(logging.INFO, logger="towerann.index.ivfpq_resumable"):
        ResumableBuild(vdir, work, PARAMS).run(on_step=steps.append, progress=False)
    assert steps == ["encode 2", "encode 3", "assemble"]  # training and parts 0, 1 were not done again
    said = [r.getMessage() for r in caplog.records]  # what a build under nohup shows with -v (no progress bar)
    assert any("part 3 encoded, 4 of 4" in m for m in said) and any("assembled" in m for m in said), said
    for part in work.glob("part-*.npy"):  # once assembled, the parts' files may go (disk); nothing is redone
        part.unlink()
    again: list[str] = []
    assert len(ResumableBuild(vdir, work, PARAMS).run(on_step=again.append, progress=False)) == N and not again
    # and the CLI, pointed at the finished work directory, publishes what an in-memory build does
    assert built(vdir, tmp_path / "indexes", "--resume-dir", str(work)) == in_memory


def test_a_work_directory_of_other_inputs_is_refused(catalog, tmp_path, capsys):
    vdir, _ = catalog
    work = tmp_path / "work"
    ResumableBuild(vdir, work, PARAMS).run(on_step=lambda name: None, progress=False)
    with pytest.raises(ConfigError, match=r"other inputs \(they differ in build_params\)"):
        ResumableBuild(vdir, work, {**PARAMS, "nlist": 32})
    # the CLI: one line, non-zero exit, for that and for a kind it does not build part by part
    for kind, params in (("ivfpq", ["--param=nlist=32"]), ("hnsw", [])):
        argv = ["index", "build", "--vectors", str(vdir), "--kind", kind, "--out", str(tmp_path / "ix")]
        assert main([*argv, *params, "--resume-dir", str(work)]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("towerann index: error: ") and "\n" not in err, err
    assert "--kind hnsw builds in memory" in err


def test_a_loaded_ivfpq_saved_again_links_its_files_until_items_are_added(catalog, in_memory_root, tmp_path):
    _, queries = catalog
    source = in_memory_root / current_version(in_memory_root)
    index = load_snapshot(in_memory_root)
    index.remove([5])  # a slot-table change only: the vector and list files stay as they are
    same = publish(index, tmp_path / "a", "m-test")
    for name in ("ivfpq_lists.bin", "vectors.npy", "rerank.npy"):
        assert (same / name).stat().st_ino == (source / name).stat().st_ino, name
    assert 5 not in load_snapshot(same)
    new_id = 10**6
    index.add(queries[:1] * 3, [new_id])  # an item of its own: the query's own direction, far from the rest
    grown = publish(index, tmp_path / "b", "m-test")
    assert (grown / "vectors.npy").stat().st_ino != (source / "vectors.npy").stat().st_ino
    reloaded = load_snapshot(grown)
    assert len(reloaded) == N and reloaded.search(queries[:1], 1).ids[0, 0] == new_id


def test_without_a_float32_copy_it_writes_the_in_memory_builds_files_too(catalog, tmp_path):
    """keep_float32=false (the 100M layout: the float16 re-rank rows are the only copy of the vectors)."""
    vdir, _ = catalog
    lean = "--param=keep_float32=false"
    expected = built(vdir, tmp_path / "in-memory", lean)
    assert "vectors.npy" not in expected and "rerank.npy" in expected
    assert built(vdir, tmp_path / "resumable", lean, "--resume-dir", str(tmp_path / "work")) == expected


def test_a_generated_catalog_is_built_with_no_vectors_file(tmp_path):
    """The 100M-style source: parts drawn from a seeded generator, each the same whenever it is made."""
    gen = FarOffParts(10_000, 2500, 32, seed=7, n_clusters=40)
    first, _ = gen.part(3)
    assert np.array_equal(gen.part(3)[0], first) and not np.array_equal(gen.part(2)[0], first)
    assert np.array_equal(FarOffParts(10_000, 2500, 32, seed=7, n_clusters=40).part(3)[0], first)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)

    params = {**PARAMS, "keep_float32": False, "coarse": "hnsw"}  # the 100M layout: lean, a graph over the centroids
    built_parts = ResumableBuild(gen, tmp_path / "work", params).run(progress=False)
    assert "_HNSW32," in built_parts.describe()
    whole = np.concatenate([gen.part(i)[0] for i in range(4)])
    in_memory = create("ivfpq", 32, **params)
    in_memory.build(whole, np.arange(10_000), gen.clusters)
    a = read_checked_manifest(publish(in_memory, tmp_path / "a", "m"))["checksums"]
    assert read_checked_manifest(publish(built_parts, tmp_path / "b", "m"))["checksums"] == a
    assert not any(p.suffix == ".npy" and p.name.startswith("vectors") for p in (tmp_path / "work").rglob("*"))
    q = gen.queries(20)
    assert recall_at_k(built_parts.search(q, 10).ids, built_parts.exact_search(q, 10).ids) >= 0.8
    with pytest.raises(ConfigError, match="they differ in seed"):
        ResumableBuild(FarOffParts(10_000, 2500, 32, seed=8, n_clusters=40), tmp_path / "work", params)


def test_generated_queries_of_each_style_are_unit_and_seeded():
    gen = FarOffParts(10_000, 2500, 32, seed=7, n_clusters=40)
    for style in ("cluster", "far"):
        q = gen.queries(30, seed=2, style=style)
        assert q.shape == (30, 32) and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
        assert np.array_equal(q, gen.queries(30, seed=2, style=style))
    # a cluster query sits nearer its best item than a far-off one does (mean best score over the catalog)
    whole = np.concatenate([gen.part(i)[0] for i in range(4)])
    best = {s: float((gen.queries(200, style=s) @ whole.T).max(axis=1).mean()) for s in ("cluster", "far")}
    assert best["cluster"] > best["far"], best
    with pytest.raises(ConfigError, match="query style 'user'"):
        gen.queries(3, style="user")

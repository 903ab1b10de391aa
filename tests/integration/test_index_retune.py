"""`towerann index tune`: a published snapshot re-tuned without a rebuild (index/retune.py).

The snapshot is built tuned to a low recall target (a cheap setting, as a build tuned on a busy
machine can end up with the wrong one), then re-tuned to a high one: the new version must be
CURRENT, reach the new target against exact search, share the old version's data files (hard
links, not copies), verify its checksums, and leave the old version loadable for a rollback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from towerann.data.synth_vectors import far_off_catalog
from towerann.data.vectors_dir import write_vectors
from towerann.index.commands import add_commands
from towerann.index.snapshot import current_version, list_versions, load_snapshot
from towerann.index.tune import recall_at_k

D, N, K = 32, 20_000, 20


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="towerann")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _tree(directory):
    """Every file below a version directory except its own manifest (which a re-tune rewrites)."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p != directory / "manifest.json"
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory, fixed_tuner_costs_module):
    tmp = tmp_path_factory.mktemp("retune")
    cat = far_off_catalog(N, 300, D, seed=3)
    vectors = write_vectors(
        tmp / "vectors",
        cat.vectors,
        np.arange(N, dtype=np.int64),
        np.zeros(N, np.int32),
        np.ones(N, bool),
        ["a"],
        "tower-r",
        np.arange(N),
    )
    np.save(tmp / "queries.npy", cat.queries[:150])
    np.save(tmp / "heldout.npy", cat.queries[150:])
    root = tmp / "indexes"
    # exact_below=0: every search goes through IVF-PQ, so the setting is what decides recall
    assert (
        run(
            [
                "index",
                "build",
                "--vectors",
                str(vectors),
                "--kind",
                "ivfpq",
                "--out",
                str(root),
                "--recall",
                "0.3",
                "--k",
                str(K),
                "--queries",
                str(tmp / "queries.npy"),
                "--param",
                "nlist=128",
                "--param",
                "exact_below=0",
            ]
        )
        == 0
    )
    version = root / current_version(root)
    (version / "model").mkdir()
    (version / "model" / "manifest.json").write_text('{"kind": "model"}')  # as a bundle carries its model
    return tmp, root, cat


def test_a_retuned_snapshot_reaches_the_new_target_and_shares_the_old_files(published, capsys, fixed_tuner_costs):
    tmp, root, cat = published
    old = current_version(root)
    low = load_snapshot(root)
    heldout = cat.queries[150:]
    truth = low.exact_search(heldout, K).ids
    low_recall = recall_at_k(low.search(heldout, K).ids, truth)
    assert low_recall < 0.5, "the cheap build must leave room for the re-tune to show"

    assert (
        run(["index", "tune", str(root), "--recall", "0.75", "--k", str(K), "--queries", str(tmp / "queries.npy")]) == 0
    )
    assert "snapshot:" in capsys.readouterr().out
    new = current_version(root)
    assert new != old and list_versions(root) == sorted([old, new])
    high = load_snapshot(root)  # checksums verified
    assert high.manifest["retuned_from"] == old
    assert high.search_defaults["exact_below"] == 0  # an explicit build param survives the re-tune
    assert high.search_defaults["nprobe"] > low.search_defaults["nprobe"]
    assert recall_at_k(high.search(heldout, K).ids, truth) >= 0.7 > low_recall + 0.2
    for name in ("ivfpq.faiss", "vectors.npy", "slot_ids.npy"):
        assert os.stat(root / old / name).st_ino == os.stat(root / new / name).st_ino, name
    # every file is carried, manifests of subdirectories (a bundle's model/, partitions) included
    assert _tree(root / new) == _tree(root / old)
    assert load_snapshot(root / old).search_defaults == low.search_defaults  # rollback target intact


def test_tune_without_queries_or_on_a_version_dir_is_one_line_and_nonzero(published):
    tmp, root, _ = published
    for extra in ([], ["--queries", str(tmp / "queries.npy")]):
        target = str(root) if not extra else str(root / current_version(root))
        r = subprocess.run(
            [sys.executable, "-m", "towerann.cli", "index", "tune", target, "--recall", "0.9", *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr

"""`bench drift` builds its bundle once per workload and reuses it: a cached bundle must be of the same catalog.

The catalog is drawn together with the new block (--new-share), so another share is another catalog: a 1M
run at --new-share 0.02 that reused the bundle built at 0.2 served other vectors than the client checked
against, and measured recall 0.000 in every phase."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from towerann.bench.drift import make_workload, prepared_root

ITEMS, DIM = 2000, 8


def _args(workdir: Path, new_share: float) -> argparse.Namespace:
    return argparse.Namespace(
        items=ITEMS,
        new_share=new_share,
        dim=DIM,
        kind="hnsw",
        recall=0.9,
        k=10,
        seed=0,
        build_params={},
        workdir=workdir,
    )


def test_another_new_share_is_another_cached_bundle(tmp_path: Path) -> None:
    roots = {}
    for share in (0.2, 0.1):
        work = make_workload(ITEMS, share, DIM, seed=0)
        roots[share], _ = prepared_root(_args(tmp_path, share), work, {})
    a, b = make_workload(ITEMS, 0.2, DIM, 0), make_workload(ITEMS, 0.1, DIM, 0)
    assert not np.array_equal(a.vectors[:ITEMS], b.vectors[:ITEMS])  # the premise: two catalogs
    assert roots[0.2] != roots[0.1]

    built = (roots[0.1].parent / "build.json").stat().st_mtime_ns
    again, _ = prepared_root(_args(tmp_path, 0.1), b, {})
    assert again == roots[0.1]
    assert (again.parent / "build.json").stat().st_mtime_ns == built  # reused, not rebuilt

"""The batch rebuild: catalog + delta log up to a cut-off -> item tower -> index -> a new bundle.

The cut-off is the delta log's last seq when the rebuild starts; it is recorded in the bundle, and
the server replays only the entries after it when it swaps the bundle in, so writes acknowledged
during the rebuild are not lost. A new model directory (`model_dir`) swaps user and item tower
together with the index: they are one bundle.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from itertools import takewhile
from pathlib import Path
from typing import Any

from towerann.artifacts import atomic_dir
from towerann.data.dataset import read_items
from towerann.errors import DataError
from towerann.freshness.deltalog import DeltaLog
from towerann.freshness.live import fold_catalog
from towerann.index.build import Tuning

log = logging.getLogger(__name__)


def refresh(data_dir: str | Path, model_dir: str | Path, index_root: str | Path, delta: DeltaLog,
            kind: str = "auto", recall: float | None = 0.95, k: int = 100, keep: int = 3,
            progress: bool | None = None) -> dict[str, Any]:
    """Rebuild and publish a bundle; returns {path, delta_seq, items, seconds}."""
    from towerann.embed.runner import embed_catalog
    from towerann.embed.vectors import read_vectors
    from towerann.serving.bundle import publish_bundle

    t0 = time.perf_counter()
    cut = delta.last_seq()
    catalog = fold_catalog(read_items(data_dir), takewhile(lambda e: e.seq <= cut, delta.since(0)))
    root = Path(index_root)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".refresh-", dir=root))  # beside the bundles: same disk, cleaned below
    try:
        with atomic_dir(work / "catalog") as tmp:
            catalog.to_parquet(tmp / "items.parquet", index=False)
        embed_catalog(model_dir, work / "catalog", work / "vectors", progress=progress)
        tuning = _tuning(model_dir, data_dir, k, recall) if recall is not None and kind != "exact" else None
        path = publish_bundle(root, model_dir, read_vectors(work / "vectors"), kind=kind, tuning=tuning, keep=keep,
                              delta_seq=cut)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"path": str(path), "delta_seq": cut, "items": len(catalog), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("refresh: published %s (%d items, delta log folded up to seq %d) in %.1fs",
             path, len(catalog), cut, out["seconds"])
    return out


def _tuning(model_dir: str | Path, data_dir: str | Path, k: int, recall: float) -> Tuning | None:
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel

    try:
        queries = heldout_user_queries(TwoTowerModel.load(model_dir), data_dir, max_queries=1000)
    except DataError as e:  # a catalog without interactions: nothing to tune on
        log.warning("refresh: no held-out user queries in %s (%s); search defaults stay untuned", data_dir, e)
        return None
    return Tuning(queries, k, recall) if len(queries) else None

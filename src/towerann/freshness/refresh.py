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
from collections.abc import Iterable
from dataclasses import replace
from itertools import takewhile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerann.artifacts import atomic_dir
from towerann.data.dataset import read_items
from towerann.data.vectors_dir import VectorSet
from towerann.errors import DataError
from towerann.freshness.deltalog import DeltaEntry, DeltaLog
from towerann.freshness.live import fold_catalog, usable
from towerann.index.build import Tuning

log = logging.getLogger(__name__)


def refresh(
    data_dir: str | Path,
    model_dir: str | Path,
    index_root: str | Path,
    delta: DeltaLog,
    kind: str = "auto",
    recall: float | None = 0.95,
    k: int = 100,
    keep: int = 3,
    progress: bool | None = None,
    params: dict[str, Any] | None = None,
    attributes: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Rebuild and publish a bundle; returns {path, delta_seq, items, seconds}. `params`: build and
    search params of the index (as `towerann index build --param`); `attributes`: the catalog columns
    requests may filter on besides category ([filters] attributes), with the values item writes gave them."""
    from towerann.embed.runner import embed_catalog
    from towerann.freshness.publish import publish_bundle

    t0 = time.perf_counter()
    cut = delta.last_seq()
    items = read_items(data_dir)
    entries = list(takewhile(lambda e: e.seq <= cut, delta.since(0)))
    catalog = fold_catalog(items, _embeddable(model_dir, entries, items["item_id"].dtype.kind in "iu"))
    root = Path(index_root)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".refresh-", dir=root))  # beside the bundles: same disk, cleaned below
    try:
        with atomic_dir(work / "catalog") as tmp:
            catalog.to_parquet(tmp / "items.parquet", index=False)
        embed_catalog(model_dir, work / "catalog", work / "vectors", progress=progress, attributes=tuple(attributes))
        tuning = _tuning(model_dir, data_dir, k, recall) if recall is not None and kind != "exact" else None
        # By path: the bundle takes the vectors directory's filter attributes too.
        path = publish_bundle(
            root, model_dir, work / "vectors", kind=kind, params=params, tuning=tuning, keep=keep, delta_seq=cut
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"path": str(path), "delta_seq": cut, "items": len(catalog), "seconds": round(time.perf_counter() - t0, 2)}
    log.info(
        "refresh: published %s (%d items, delta log folded up to seq %d) in %.1fs",
        path,
        len(catalog),
        cut,
        out["seconds"],
    )
    return out


def _embeddable(model_dir: str | Path, entries: list[DeltaEntry], int_ids: bool) -> list[DeltaEntry]:
    """The entries without the upserts the item tower cannot turn into a usable vector (live.usable; a log
    written before writes were checked may hold one): skipped and reported, as `replay` skips them, so that
    one bad entry cannot fail every rebuild."""
    from towerann.model.model import TwoTowerModel

    upserts = [e for e in entries if e.op == "upsert"]
    if not upserts:
        return entries
    model = TwoTowerModel.load(model_dir)

    def embeddable(batch: list[DeltaEntry]) -> np.ndarray:
        frame = pd.DataFrame([e.payload for e in batch])
        if int_ids:
            frame["item_id"] = frame["item_id"].astype(np.int64)
        return usable(model.encode_items(frame))

    try:
        ok = embeddable(upserts)
    except Exception:  # a row the encoder cannot read at all: find it one row at a time
        ok = np.array([_quietly(embeddable, [e]) for e in upserts])
    bad = {e.seq for e, good in zip(upserts, ok) if not good}
    for e in upserts:
        if e.seq in bad:
            log.error(
                "refresh: skipped delta-log entry %d (upsert of item %r): the item tower gives no usable "
                "vector for its features (non-finite, or of near-zero norm)",
                e.seq,
                e.item_id,
            )
    return [e for e in entries if e.seq not in bad]


def _quietly(embeddable: Any, batch: list[DeltaEntry]) -> bool:
    try:
        return bool(embeddable(batch)[0])
    except Exception:
        return False


def _tuning(model_dir: str | Path, data_dir: str | Path, k: int, recall: float) -> Tuning | None:
    from towerann.model.evaluate import heldout_user_queries
    from towerann.model.model import TwoTowerModel

    try:
        queries = heldout_user_queries(TwoTowerModel.load(model_dir), data_dir, max_queries=1000)
    except DataError as e:  # a catalog without interactions: nothing to tune on
        log.warning("refresh: no held-out user queries in %s (%s); search defaults stay untuned", data_dir, e)
        return None
    return Tuning(queries, k, recall) if len(queries) else None


def refresh_vectors(
    source: str | Path,
    index_root: str | Path,
    delta: DeltaLog,
    *,
    ids: str | Path | None = None,
    id_column: str = "item_id",
    vector_column: str = "vector",
    category_column: str | None = None,
    available_column: str | None = None,
    attributes: tuple[str, ...] | list[str] = (),
    normalize: bool = False,
    queries: np.ndarray | None = None,
    kind: str = "auto",
    recall: float | None = 0.95,
    k: int = 100,
    keep: int = 3,
    params: dict[str, Any] | None = None,
    space_id: str | None = None,
) -> dict[str, Any]:
    """Publish a vectors-only bundle (no towers) from vectors made elsewhere; returns as `refresh`.

    The file is the catalog: it is imported (freshness.publish.import_vector_file), the delta log's
    availability changes and deletes up to the cut-off are folded in (an upsert needs an item tower:
    skipped and logged), the index is built and tuned to `recall`@`k` on `queries` (default: a seeded
    sample of the catalog's own vectors, which overestimates recall; see freshness.publish) and the
    bundle is published. A running server swaps it in like any other. `space_id` names the vector space
    in the manifest (default: the file's version, "external-<checksum>", new with every file)."""
    from towerann.freshness.publish import catalog_queries, import_vector_file, publish_bundle

    t0 = time.perf_counter()
    cut = delta.last_seq()
    root = Path(index_root)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".refresh-", dir=root))
    try:
        vs, attrs = import_vector_file(
            source,
            work / "vectors",
            ids=ids,
            id_column=id_column,
            vector_column=vector_column,
            category_column=category_column,
            available_column=available_column,
            attributes=tuple(attributes),
            normalize=normalize,
        )
        vs = _fold_vectors(vs, takewhile(lambda e: e.seq <= cut, delta.since(0)))
        if space_id:
            vs = replace(vs, model_version=str(space_id))
        tuning = None
        if recall is not None and kind != "exact":
            q = catalog_queries(vs.vectors) if queries is None else np.asarray(queries, np.float32)
            if q.ndim != 2 or q.shape[1] != vs.dim:
                raise DataError(f"tuning queries: expected [n, {vs.dim}] vectors, got shape {q.shape}")
            tuning = Tuning(q, k, recall)
        path = publish_bundle(
            root, None, vs, kind=kind, params=params, tuning=tuning, keep=keep, delta_seq=cut, attributes=attrs
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"path": str(path), "delta_seq": cut, "items": len(vs), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("refresh: published vectors-only %s (%d items, delta log folded up to seq %d)", path, len(vs), cut)
    return out


def _fold_vectors(vs: VectorSet, entries: Iterable[DeltaEntry]) -> VectorSet:
    """A vector set with the log's availability changes and deletes applied (by the catalog's item id).
    Deleted items leave the rows (ids, vectors, categories, available); the id map keeps every row."""
    key = {str(e): i for i, e in enumerate(vs.external_ids.tolist())}
    internal = {int(i): j for j, i in enumerate(vs.ids.tolist())}  # internal id -> row
    available = vs.available.copy()
    keep = np.ones(len(vs.ids), bool)
    for e in entries:
        iid = key.get(e.item_id)
        row = internal.get(iid) if iid is not None else None
        if e.op == "upsert":
            log.warning(
                "refresh --vectors: skipped delta-log entry %d (upsert of item %r): a vectors-only bundle has no "
                "item tower; put the item's vector in the vectors file",
                e.seq,
                e.item_id,
            )
        elif row is None:
            continue
        elif e.op == "available":
            available[row] = bool(e.payload.get("available"))
        elif e.op == "delete":
            keep[row] = False
    return replace(
        vs,
        vectors=vs.vectors[keep],
        ids=vs.ids[keep],
        categories=vs.categories[keep],
        available=available[keep],
    )

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
from towerann.data.attributes import attribute_key
from towerann.data.dataset import read_items
from towerann.data.vectors_dir import UNKNOWN_CATEGORY, VectorSet
from towerann.errors import BadRequest, DataError
from towerann.freshness.deltalog import DeltaEntry, DeltaLog
from towerann.freshness.live import VECTOR, fold_catalog, usable
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

    written = [e for e in entries if e.op == "upsert" and VECTOR in e.payload]
    for e in written:  # a vectors-only bundle's write: a vector of another space, no features to embed
        log.error(
            "refresh: skipped delta-log entry %d (upsert of item %r): a vector written to a vectors-only bundle; "
            "this bundle's item tower makes its vectors from features: write the item again with them",
            e.seq,
            e.item_id,
        )
    entries = [e for e in entries if not (e.op == "upsert" and VECTOR in e.payload)]
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
    writes up to the cut-off are folded in as `refresh` folds them into a catalog (vector upserts, availability,
    deletes: the log wins over the file for the items it names; an upsert without a vector needs an item tower:
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
        vs, attrs = _fold_vectors(vs, attrs, takewhile(lambda e: e.seq <= cut, delta.since(0)), normalize)
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


SKIPPED = "refresh --vectors: skipped delta-log entry %d (upsert of item %r): %s"


def _fold_vectors(
    vs: VectorSet,
    attrs: dict[str, tuple[np.ndarray, list[str]]],
    entries: Iterable[DeltaEntry],
    normalize: bool = False,
) -> tuple[VectorSet, dict[str, tuple[np.ndarray, list[str]]]]:
    """A vector set (and its filter attributes) with the log's writes applied by the catalog's item id, as
    `live.apply_entries` applies them to a served bundle: upserts with a vector add an item or replace its
    vector, category, availability and the attributes they give; availability changes; deletes. Deleted
    items leave the rows; the id map keeps every id. `normalize`: written vectors are L2-normalised as the
    file's were. An upsert without a usable vector of this dim (written to a model bundle, or before the
    file changed dim) is skipped and logged, as `replay` skips it: one bad entry cannot fail every refresh."""
    int_ids = vs.external_ids.dtype.kind in "iu"
    key = {str(e): i for i, e in enumerate(vs.external_ids.tolist())}  # item id -> internal id
    row_of = {int(i): j for j, i in enumerate(vs.ids.tolist())}  # internal id -> row
    vectors = vs.vectors
    categories, available = vs.categories.copy(), vs.available.copy()
    keep = np.ones(len(vs.ids), bool)
    names = list(vs.category_names)
    cat_code = {n: i for i, n in enumerate(names)}
    codes = {a: c.copy() for a, (c, _) in attrs.items()}
    vocab = {a: list(v) for a, (_, v) in attrs.items()}
    value_code = {a: {x: i for i, x in enumerate(v)} for a, v in vocab.items()}
    added: dict[str, dict[str, Any]] = {}  # new item id -> {vector, category, available, attribute codes}
    replaced: dict[int, np.ndarray] = {}  # row -> its written vector

    def category(payload: dict[str, Any]) -> int:
        name = str(payload.get("category") or UNKNOWN_CATEGORY)
        if name not in cat_code:  # a category the file does not have: the next code, as the served bundle gives
            cat_code[name] = len(names)
            names.append(name)
        return cat_code[name]

    def attribute_codes(payload: dict[str, Any], current: dict[str, int]) -> dict[str, int]:
        out = dict(current)
        for a in codes:
            if a in payload:  # left out: the item keeps its value; null clears it
                value = payload[a]
                if value is None:
                    out[a] = -1
                else:
                    v = attribute_key(value, a)
                    if v not in value_code[a]:
                        value_code[a][v] = len(vocab[a])
                        vocab[a].append(v)
                    out[a] = value_code[a][v]
        return out

    for e in entries:
        iid = key.get(e.item_id)
        row = row_of.get(iid) if iid is not None else None
        if e.op == "upsert":
            vector = _written_vector(e, vs.dim)
            if vector is None:
                continue
            try:
                if row is None and int_ids and str(int(e.item_id)) != e.item_id:
                    raise BadRequest(f"{e.item_id!r} is not an id of this catalog of integer ids")
                before = {a: int(codes[a][iid]) for a in codes} if row is not None else {a: -1 for a in codes}
                written = attribute_codes(e.payload, added.get(e.item_id, {}).get("attributes", before))
            except (BadRequest, ValueError) as why:  # a log written elsewhere or by hand: skipped, as replay does
                log.warning(SKIPPED, e.seq, e.item_id, why)
                continue
            if row is None:
                added[e.item_id] = {
                    "vector": vector,
                    "category": category(e.payload),
                    "available": bool(e.payload.get("available", True)),
                    "attributes": written,
                }
                continue
            keep[row] = True  # an upsert after a delete brings the item back, as on the served bundle
            replaced[row] = vector
            categories[row] = category(e.payload)
            available[row] = bool(e.payload.get("available", True))
            for a, c in written.items():
                codes[a][iid] = c
        elif e.op == "available":
            if e.item_id in added:
                added[e.item_id]["available"] = bool(e.payload.get("available"))
            elif row is not None and keep[row]:
                available[row] = bool(e.payload.get("available"))
        elif e.op == "delete":
            added.pop(e.item_id, None)
            if row is not None:
                keep[row] = False
    if replaced:
        vectors = vectors.copy()
        rows = np.fromiter(replaced, np.int64, len(replaced))
        vectors[rows] = np.stack(list(replaced.values()))
        if normalize:
            vectors[rows] /= np.linalg.norm(vectors[rows], axis=1, keepdims=True)
    new_internal = np.arange(len(vs.external_ids), len(vs.external_ids) + len(added), dtype=np.int64)
    external_ids = vs.external_ids
    if added:
        if int_ids:
            ext = np.asarray([int(i) for i in added], np.int64)
        else:  # a longer id may need a wider unicode dtype
            ext = np.asarray(list(added))
            ext = ext.astype(np.result_type(vs.external_ids.dtype, ext.dtype))
        external_ids = np.concatenate([vs.external_ids, ext])
        for a in codes:
            codes[a] = np.concatenate([codes[a], np.asarray([r["attributes"][a] for r in added.values()], np.int32)])
    new_vectors = np.stack([r["vector"] for r in added.values()]) if added else np.empty((0, vs.dim), np.float32)
    if normalize and added:
        new_vectors /= np.linalg.norm(new_vectors, axis=1, keepdims=True)
    folded = replace(
        vs,
        vectors=np.concatenate([vectors[keep], new_vectors]),
        ids=np.concatenate([vs.ids[keep], new_internal]),
        categories=np.concatenate([categories[keep], np.asarray([r["category"] for r in added.values()], np.int32)]),
        available=np.concatenate([available[keep], np.asarray([r["available"] for r in added.values()], bool)]),
        category_names=names,
        external_ids=external_ids,
    )
    return folded, {a: (codes[a], vocab[a]) for a in codes}


def _written_vector(e: DeltaEntry, dim: int) -> np.ndarray | None:
    """The usable float32 [dim] vector a logged upsert carries, else None (logged)."""
    value = e.payload.get(VECTOR)
    if value is None:
        why = "it has no vector (written to a bundle with an item tower): write the item again with its vector"
    elif not isinstance(value, list) or len(value) != dim:
        why = f"its vector is not {dim} numbers (written before the vectors changed dim?)"
    else:
        try:
            v = np.asarray(value, np.float32)
        except (TypeError, ValueError, OverflowError):
            v = np.full(dim, np.nan, np.float32)
        if v.shape == (dim,) and usable(v[None, :])[0]:
            return v
        why = "its vector is not finite numbers, or of near-zero norm"
    log.warning(SKIPPED, e.seq, e.item_id, why)
    return None

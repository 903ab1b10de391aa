"""Publishing a retrieval bundle: a build step (refresh, the demo, benchmarks, tests).

`publish_bundle` builds (or takes) an index over an embedded catalog and writes it, with the model and
the id map, as a bundle under an index root (the layout `towerann.serving.bundle.RetrievalBundle.load`
reads; its docstring describes it), then points CURRENT at it.

With no model (`model_dir=None`) it publishes a *vectors-only* bundle: vectors made elsewhere
(`import_vector_file`: a Parquet id + list-of-floats file, or a .npy matrix + ids, with category,
availability and attribute columns), served for `query_vector` requests as they are. Its manifest says
`"bundle": {"model": null, "space_id": S}` (S: the vectors' version, "external-<checksum>" for an
imported file) and it holds `validation_queries.npy`, the sample a server's reload checks recall on.
With no user tower there are no user queries to tune on: `catalog_queries` samples the catalog's
own vectors instead. Those overestimate recall (an item's own vector finds the item and its close
neighbours easily; real queries sit between items), so the target is kept and, where real queries
exist (`towerann refresh --vectors F --queries q.npy`, `towerann index tune --queries`), they win.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import save_npy
from towerann.data.attributes import column_values, encode_column, read_vector_attributes
from towerann.data.external_vectors import import_vectors
from towerann.data.vectors_dir import VectorSet, read_vectors
from towerann.errors import ArtifactError, IndexIncompatible
from towerann.index import Index
from towerann.index.build import Tuning, build_index
from towerann.index.snapshot import publish
from towerann.serving.bundle import BUNDLE_FORMAT, VALIDATION_QUERIES_FILE
from towerann.serving.item_tables import save_id_lookup

log = logging.getLogger(__name__)


def _vector_set(vectors: VectorSet | str | Path) -> VectorSet:
    return vectors if isinstance(vectors, VectorSet) else read_vectors(vectors)


VALIDATION_SAMPLE = 64  # query vectors a vectors-only bundle carries for the reload's recall check
CATALOG_QUERIES = 1000  # item vectors sampled as tuning queries when no user tower makes queries


def catalog_queries(vectors: np.ndarray, n: int = CATALOG_QUERIES, seed: int = 0) -> np.ndarray:
    """A seeded sample of the catalog's own vectors, as queries (float32 [min(n, items), dim])."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))
    return np.ascontiguousarray(vectors[picks], dtype=np.float32)


def import_vector_file(
    source: str | Path,
    out: str | Path,
    *,
    ids: str | Path | None = None,
    id_column: str = "item_id",
    vector_column: str = "vector",
    category_column: str | None = None,
    available_column: str | None = None,
    attributes: tuple[str, ...] | list[str] = (),
    normalize: bool = False,
) -> tuple[VectorSet, dict[str, tuple[np.ndarray, list[str]]]]:
    """Import vectors made elsewhere into the vectors directory `out` (data.external_vectors) and read
    the filter `attributes` columns of the same Parquet file: (the vectors, {name: (int32 code per
    internal id, sorted values)}). Internal ids are the file's row numbers, in both."""
    import pyarrow.parquet as pq

    from towerann.errors import DataError

    import_vectors(
        source,
        out,
        ids=ids,
        id_column=id_column,
        vector_column=vector_column,
        category_column=category_column,
        available_column=available_column,
        normalize=normalize,
        overwrite=True,
    )
    vs = read_vectors(out)
    attrs: dict[str, tuple[np.ndarray, list[str]]] = {}
    if attributes:
        if Path(source).suffix == ".npy":
            raise DataError(f"{source}: a .npy matrix has no attribute columns; give a Parquet file")
        pf = pq.ParquetFile(source)
        missing = [a for a in attributes if a not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{source}: no attribute column(s) {missing}; it has {pf.schema_arrow.names}")
        vocab = column_values(pf, attributes)
        table = pf.read(columns=list(attributes))
        for name in attributes:
            codes = encode_column(table.column(name), vocab[name])
            if len(codes) != len(vs.external_ids):
                raise DataError(f"{source}: column {name!r} has {len(codes)} rows, {len(vs.external_ids)} vectors")
            attrs[name] = (codes, vocab[name])
    return vs, attrs


def publish_bundle(
    root: str | Path,
    model_dir: str | Path | None,
    vectors: VectorSet | str | Path,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    tuning: Tuning | None = None,
    keep: int = 3,
    index: Index | None = None,
    delta_seq: int = 0,
    attributes: dict[str, tuple[np.ndarray, list[str]]] | None = None,
    calibrate_filters: bool = True,
    validation_queries: np.ndarray | None = None,
) -> Path:
    """Build (or take) an index over `vectors`, write a bundle under `root`, point CURRENT at it.

    delta_seq: the last delta-log entry folded into `vectors` (a refresh's cut-off); a server that
    loads the bundle replays only the entries after it. `attributes`: the filter attributes
    ({name: (int32 code per internal id, vocabulary)}); default: those of a vectors directory given
    by path (embed.attributes). With `tuning`, a built index also gets its filter plan measured
    (by index.build.build_index, at tuning.k), unless calibrate_filters is False or the index is sharded.

    kind="sharded": params {"shards": S, "backend": "hnsw", <the backend's build and search params>};
    tuning tunes the shards' search params (the same for every shard).

    model_dir None: a vectors-only bundle (no towers), its space id the vectors' model_version; it
    carries `validation_queries` (default: the tuning queries, else a sample of its own vectors)."""
    from towerann.model.model import model_version_of

    vs = _vector_set(vectors)
    model_version = vs.model_version if model_dir is None else model_version_of(model_dir)
    if model_dir is not None and vs.model_version != model_version:
        raise IndexIncompatible(
            f"vectors come from item tower {vs.model_version!r} but {model_dir} is "
            f"{model_version!r}; embed the catalog with this model first"
        )
    if attributes is None:
        attributes = {} if isinstance(vectors, VectorSet) else read_vector_attributes(vectors)
    if index is None:
        # build_index measures the filter plan when it tunes (index.build: one calibration for every build)
        index = build_index(
            vs.vectors,
            vs.ids,
            vs.categories,
            vs.available,
            kind=kind,
            params=params,
            tuning=tuning,
            metric=vs.metric,
            calibrate_filters=calibrate_filters if tuning is not None else False,
        )
    for name, (codes, values) in attributes.items():
        if len(codes) < len(vs.external_ids) or (len(codes) and int(codes.max()) >= len(values)):
            raise ArtifactError(
                f"attribute {name!r}: expected a code (< {len(values)} values) per internal id, "
                f"got {len(codes)} codes for {len(vs.external_ids)} ids"
            )
    if attributes:
        index.set_attributes(vs.ids, {name: codes[vs.ids] for name, (codes, _) in attributes.items()})
    if sorted(attributes) != index.attribute_names:
        raise ArtifactError(
            f"the index holds attributes {index.attribute_names} but their values are given for "
            f"{sorted(attributes)}; pass attributes= for each"
        )
    n_ext = int(vs.ids.max()) + 1 if len(vs) else 0
    if len(vs.external_ids) < n_ext or len(vs.categories) != len(vs.ids):
        raise ArtifactError("vectors: external_ids must cover every internal id and categories one per item")
    # Per internal id, so that lookups are one array index; internal ids are catalog rows.
    item_cats = np.full(len(vs.external_ids), -1, np.int32)
    item_cats[vs.ids] = vs.categories

    if model_dir is None and validation_queries is None:
        validation_queries = tuning.queries if tuning is not None else catalog_queries(vs.vectors, VALIDATION_SAMPLE)
    space = {"model": None, "space_id": model_version} if model_dir is None else {}

    def add_files(tmp: Path) -> None:
        if model_dir is not None:
            shutil.copytree(model_dir, tmp / "model")
        else:
            queries = np.asarray(validation_queries, np.float32)[:VALIDATION_SAMPLE]
            save_npy(tmp / VALIDATION_QUERIES_FILE, np.ascontiguousarray(queries))
        save_npy(tmp / "external_ids.npy", np.asarray(vs.external_ids))
        save_id_lookup(tmp, np.asarray(vs.external_ids))  # mapped by a load, not sorted again
        save_npy(tmp / "item_categories.npy", item_cats)

    path = publish(
        index,
        root,
        model_version,
        keep=keep,
        add_files=add_files,
        extra={
            "bundle": {
                "format": BUNDLE_FORMAT,
                "category_names": list(vs.category_names),
                "items": len(vs),
                "delta_seq": int(delta_seq),
                "attributes": {name: list(values) for name, (_, values) in attributes.items()},
                **space,
            }
        },
    )
    log.info(
        "published bundle %s (%s, %d items, %s %s)",
        path,
        index.describe(),
        len(index),
        "model" if model_dir is not None else "vectors only, space",
        model_version,
    )
    return path

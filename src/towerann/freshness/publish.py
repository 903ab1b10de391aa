"""Publishing a retrieval bundle: a build step (refresh, the demo, benchmarks, tests).

`publish_bundle` builds (or takes) an index over an embedded catalog and writes it, with the model and
the id map, as a bundle under an index root (the layout `towerann.serving.bundle.RetrievalBundle.load`
reads; its docstring describes it), then points CURRENT at it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import save_npy
from towerann.data.attributes import read_vector_attributes
from towerann.data.vectors_dir import VectorSet, read_vectors
from towerann.errors import ArtifactError, IndexIncompatible
from towerann.index import SHARDED, Index
from towerann.index.build import Tuning, build_index, split_params
from towerann.index.filter_plan import calibrate
from towerann.index.snapshot import publish
from towerann.serving.bundle import BUNDLE_FORMAT

log = logging.getLogger(__name__)


def _vector_set(vectors: VectorSet | str | Path) -> VectorSet:
    return vectors if isinstance(vectors, VectorSet) else read_vectors(vectors)


def publish_bundle(
    root: str | Path,
    model_dir: str | Path,
    vectors: VectorSet | str | Path,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    tuning: Tuning | None = None,
    keep: int = 3,
    index: Index | None = None,
    delta_seq: int = 0,
    attributes: dict[str, tuple[np.ndarray, list[str]]] | None = None,
    calibrate_filters: bool = True,
) -> Path:
    """Build (or take) an index over `vectors`, write a bundle under `root`, point CURRENT at it.

    delta_seq: the last delta-log entry folded into `vectors` (a refresh's cut-off); a server that
    loads the bundle replays only the entries after it. `attributes`: the filter attributes
    ({name: (int32 code per internal id, vocabulary)}); default: those of a vectors directory given
    by path (embed.attributes). With `tuning`, a built index also gets its filter plan measured
    (index.filter_plan.calibrate at tuning.k), unless calibrate_filters is False or the index is sharded.

    kind="sharded": params {"shards": S, "backend": "hnsw", <the backend's build and search params>};
    tuning tunes the shards' search params (the same for every shard)."""
    from towerann.model.model import model_version_of

    model_dir = Path(model_dir)
    model_version = model_version_of(model_dir)
    vs = _vector_set(vectors)
    if vs.model_version != model_version:
        raise IndexIncompatible(
            f"vectors come from item tower {vs.model_version!r} but {model_dir} is "
            f"{model_version!r}; embed the catalog with this model first"
        )
    if attributes is None:
        attributes = {} if isinstance(vectors, VectorSet) else read_vector_attributes(vectors)
    if index is None:
        index = build_index(
            vs.vectors, vs.ids, vs.categories, vs.available, kind=kind, params=params, tuning=tuning, metric=vs.metric
        )
        if index.kind == SHARDED and tuning is not None and calibrate_filters:
            # calibrate measures a backend's own paths; the shards keep the default thresholds
            log.info("sharded index: no filter plan measured (the shards use the default thresholds)")
        elif tuning is not None and calibrate_filters and index.kind != "exact":
            calibrate(index, tuning.queries, ks=(tuning.k,), target=tuning.recall)
            index.search_defaults.update(split_params(index.kind, dict(params or {}))[1])  # explicit params win
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

    def add_files(tmp: Path) -> None:
        shutil.copytree(model_dir, tmp / "model")
        save_npy(tmp / "external_ids.npy", np.asarray(vs.external_ids))
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
            }
        },
    )
    log.info("published bundle %s (%s, %d items, model %s)", path, index.describe(), len(index), model_version)
    return path

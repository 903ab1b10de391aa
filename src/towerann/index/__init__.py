"""ANN indexes over item vectors: the retrieval stage's top-k by inner product, with filters and live writes.

Everyone holds an `Index` (index.protocol: search, exact search, writes, save/load). The backends
(exact, hnsw, ivfpq, scann) share their slot bookkeeping in `index.base.SlotIndex`; a sharded index
(kind "sharded", index.sharded) spreads items over S of them. `create` and `load` make any kind.

index = create("hnsw", dim=128, M=32)
index.build(vectors, ids, categories, available)
index.search(queries, k=1000, filter=Filter(categories=frozenset({3})), params={"ef": 512})
publish(index, "indexes/", model_version="m1")      # towerann.index.snapshot
index = load("indexes/")                            # CURRENT -> newest snapshot
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from towerann.errors import ConfigError
from towerann.index.protocol import Filter, Index, SearchResult

# kind -> (module, class); imported on demand so an optional backend costs nothing until used.
_BACKENDS = {
    "exact": ("towerann.index.exact", "ExactIndex"),
    "hnsw": ("towerann.index.hnsw", "HNSWIndex"),
    "ivfpq": ("towerann.index.ivfpq", "IVFPQIndex"),
    "scann": ("towerann.index.scann", "ScannIndex"),
}
KINDS = tuple(_BACKENDS)  # the plain backends; "sharded" holds S indexes of one of them
SHARDED = "sharded"
_BACKENDS[SHARDED] = ("towerann.index.sharded", "ShardedIndex")


def backend_class(kind: str) -> type[Index]:
    if kind not in _BACKENDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    module, name = _BACKENDS[kind]
    cls: type[Index] = getattr(importlib.import_module(module), name)
    return cls


def create(kind: str, dim: int, metric: str = "ip", **build_params: Any) -> Index:
    """A new, empty index of the given backend."""
    try:
        return backend_class(kind)(dim, metric, **build_params)
    except TypeError as e:
        raise ConfigError(f"bad build parameters for a {kind} index: {e}") from e


def load(
    directory: str | Path,
    expected_model_version: str | None = None,
    expected_dim: int | None = None,
    verify: bool = True,
) -> Index:
    """Load a snapshot directory, or the CURRENT snapshot of a root of snapshots, checking its manifest
    (a sharded snapshot: every shard loaded into this process)."""
    from towerann.index.snapshot import load_snapshot

    return load_snapshot(
        directory, expected_model_version=expected_model_version, expected_dim=expected_dim, verify=verify
    )


__all__ = ["Filter", "Index", "KINDS", "SHARDED", "SearchResult", "backend_class", "create", "load"]

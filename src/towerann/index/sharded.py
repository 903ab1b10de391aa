"""`ShardedIndex`: an `Index` whose items are partitioned over S shards by id hash.

It implements the `Index` contract (index.protocol) itself, holding no slots: every call is routed
to the shards or fanned out and merged.

A search sends the whole query batch to every shard at once (one call per shard), each shard
answers its top-k under the filter (availability, categories, attributes all live in the shard),
and the lists are merged by score (inner product: higher is better, `merge_topk`). Adds, removals,
availability and attribute changes go to the owning shard only (`shard_hash.shard_of`).

The shards sit behind a `ShardSet`: in this process (`LocalShards`, the default, what the index
contract suite runs) or one Ray actor each (`cluster.ray_shards`). Saved, a sharded index is one
snapshot directory holding one complete sub-snapshot per shard (`shard-000/`, ...: manifest and
checksums of their own, so a shard worker can load and check its part alone); the top manifest
(written by `index.snapshot`) lists and checksums every file of every shard too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import load_npy
from towerann.errors import ArtifactError, BadRequest, ConfigError, DataError, ShardsUnavailable
from towerann.index import SHARDED, backend_class, shard_hash
from towerann.index.merge import merge_topk, padded
from towerann.index.protocol import COMMON_SEARCH, Filter, Index, SearchResult, as_vectors
from towerann.index.shard_backends import LocalShards, ShardSet
from towerann.index.snapshot import read_checked_manifest, write_snapshot

log = logging.getLogger(__name__)

KIND = SHARDED
SHARD_DIR = "shard-{:03d}"
# A shard's sub-manifest names no model: the top manifest carries the pairing, checked on load.
SHARD_MODEL = "part of a sharded snapshot"


def shard_dirs(n: int) -> list[str]:
    return [SHARD_DIR.format(s) for s in range(n)]


class ShardedIndex(Index):
    kind = KIND
    filter_paths: tuple[str, ...] = ("exact", "filtered", "post")  # the shards plan their own paths

    def __init__(self, dim: int, metric: str = "ip", shards: int = 2, backend: str = "exact", **backend_params: Any):
        n = shard_hash.check_shards(shards)
        if backend == KIND:
            raise ConfigError(
                "a sharded index's shards must be a plain backend (exact, hnsw, ivfpq, scann), not sharded"
            )
        inner = backend_class(backend)
        super().__init__(dim, metric, shards=n, backend=backend, **backend_params)
        self.backend = backend
        self.backend_params = dict(backend_params)
        self.n_shards = n
        # the shards' own search parameters, sent with every search (so `search_defaults[...] = x` reaches them)
        self.search_defaults = {**COMMON_SEARCH, **inner.default_search}
        self.shards: ShardSet = LocalShards([inner(dim, metric, **backend_params) for _ in range(n)])
        # a search without its own deadline waits this long for the shards (None: for every one; a
        # server over Ray shards sets it, so one hung shard makes answers partial, not late)
        self.deadline_s: float | None = None
        self.last_missing: tuple[int, ...] = ()  # the shards the latest search went without
        self._transitions = threading.Lock()  # concurrent searches log a shard leaving (or back) once

    @classmethod
    def over(cls, shards: ShardSet, manifest: Mapping[str, Any]) -> ShardedIndex:
        """A front over shards that live elsewhere (Ray workers), configured from the top manifest."""
        index = cls.__new__(cls)
        params = dict(manifest["build_params"])
        Index.__init__(index, int(manifest["dim"]), manifest["metric"], **params)
        index.backend = params.pop("backend")
        index.n_shards = int(params.pop("shards"))
        index.backend_params = params
        index.search_defaults = {**COMMON_SEARCH, **manifest["search_defaults"]}
        index.tuning, index.filter_calibration = manifest.get("tuning"), manifest.get("filter_calibration")
        index.manifest = dict(manifest)
        index.deadline_s, index.last_missing, index._transitions = None, (), threading.Lock()
        if shards.n != index.n_shards:
            raise ConfigError(f"{shards.n} shard workers for a snapshot of {index.n_shards} shards")
        index.shards = shards
        return index

    def switch(self, version: str) -> None:
        """Serve `version` of the same snapshot root from now on (shards on Ray workers): every shard
        loads and checks it first, then one assignment moves every later search to it."""
        manifest = self.shards.switch(version)
        self.search_defaults = {**COMMON_SEARCH, **manifest["search_defaults"]}
        self.manifest, self.version = dict(manifest), version

    def describe(self) -> str:
        return f"sharded({self.n_shards} x {self.backend})"

    def search_space(self, k: int) -> list[dict[str, Any]]:
        indexes = self.shards.local_indexes()
        return indexes[0].search_space(k) if indexes else [{}]

    # ---- routing --------------------------------------------------------------------------------
    def _per_shard(
        self, ids: np.ndarray, *columns: Any, attributes: Mapping[str, Any] | None = None
    ) -> dict[int, tuple[Any, ...]]:
        """Per owning shard: (its ids, its rows of each column (None stays None), its attributes)."""
        out: dict[int, tuple[Any, ...]] = {}
        for s, rows in enumerate(shard_hash.split(ids, self.n_shards)):
            if not len(rows):
                continue
            cols = tuple(None if c is None else np.asarray(c)[rows] for c in columns)
            attrs = None if attributes is None else {k: np.asarray(v)[rows] for k, v in attributes.items()}
            out[s] = (ids[rows], *cols, attrs)
        return out

    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = np.atleast_1d(np.asarray(ids))
        if len(ids) and not np.issubdtype(ids.dtype, np.integer):
            raise BadRequest(f"ids must be integers, got dtype {ids.dtype}")
        checked: np.ndarray = ids.astype(np.int64)
        return checked

    def _insert_rows(
        self, method: str, vectors: Any, ids: Any, categories: Any, available: Any, attributes: Mapping[str, Any] | None
    ) -> None:
        v = as_vectors(vectors, self.dim, "vectors")
        raw = np.asarray(ids)
        if raw.shape != (len(v),) or not np.issubdtype(raw.dtype, np.integer):
            # the shards would say the same, but only of their part: say it of the whole batch
            raise DataError(
                f"ids: expected {len(v)} integer ids (one per vector row), got shape {raw.shape} dtype {raw.dtype}"
            )
        ids = raw.astype(np.int64)
        for name, col in (("categories", categories), ("available", available), *(attributes or {}).items()):
            if col is not None and np.shape(col) != (len(v),):
                raise DataError(f"{name}: expected {len(v)} values (one per vector row), got shape {np.shape(col)}")
        parts = self._per_shard(ids, v, categories, available, attributes=attributes)
        # (vectors, ids, categories, available, attributes): Index.build/add's order
        self.shards.call(method, {s: (p[1], p[0], p[2], p[3], p[4]) for s, p in parts.items()})

    def build(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        if any(st["slots"] for st in self._stats()):
            raise ConfigError(
                f"{self.describe()} index already holds items; build() needs a fresh index (use add() for more items)"
            )
        self._insert_rows("build", vectors, ids, categories, available, attributes)

    def add(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self._insert_rows("add", vectors, ids, categories, available, attributes)

    def remove(self, ids: Any) -> None:
        self.shards.call("remove", {s: (p[0],) for s, p in self._per_shard(self._check_ids(ids)).items()})

    def set_available(self, ids: Any, available: bool) -> None:
        parts = self._per_shard(self._check_ids(ids))
        self.shards.call("set_available", {s: (p[0], bool(available)) for s, p in parts.items()})

    def set_attributes(self, ids: Any, attributes: Mapping[str, Any]) -> None:
        ids = self._check_ids(ids)
        parts = self._per_shard(ids, attributes=attributes)
        self.shards.call("set_attributes", {s: (p[0], p[1]) for s, p in parts.items()})

    def attribute_codes(self, ids: Any) -> dict[str, np.ndarray]:
        ids = self._check_ids(ids)
        out = {name: np.full(len(ids), -1, np.int32) for name in self.attribute_names}
        rows = shard_hash.split(ids, self.n_shards)
        answers = self.shards.call("attribute_codes", {s: (ids[r],) for s, r in enumerate(rows) if len(r)})
        for s, codes in answers.items():
            for name, values in codes.items():
                out.setdefault(name, np.full(len(ids), -1, np.int32))[rows[s]] = values
        return out

    def _stats(self) -> list[dict[str, Any]]:
        return list(self.shards.call("stats", {s: () for s in range(self.n_shards)}).values())

    @property
    def attribute_names(self) -> list[str]:
        return sorted({a for st in self._stats() for a in st["attributes"]})

    def missing_shards(self) -> tuple[int, ...]:
        """Shards the latest search left out, or left out until they are back (Ray workers restarting;
        in this process: none): what /readyz reports."""
        recovering = getattr(self.shards, "recovering", None)
        return tuple(sorted({*self.last_missing, *(recovering() if recovering is not None else ())}))

    def shard_counts(self) -> list[int]:
        return [st["count"] for st in self._stats()]

    def __len__(self) -> int:
        return sum(self.shard_counts())

    def __contains__(self, item_id: int) -> bool:
        s = int(shard_hash.shard_of([item_id], self.n_shards)[0])
        return bool(self.shards.call("__contains__", {s: (int(item_id),)})[s])

    @property
    def n_slots(self) -> int:
        return sum(st["slots"] for st in self._stats())

    def release_memory(self) -> int:
        return sum(self.shards.call("release_memory", {s: () for s in range(self.n_shards)}).values())

    # ---- search ---------------------------------------------------------------------------------
    def _merge_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.search_defaults)
        if unknown:
            raise BadRequest(
                f"search params {sorted(unknown)} are not understood by the {self.backend} shards; "
                f"they take {sorted(self.search_defaults)}"
            )
        return {**self.search_defaults, **params}

    def search(
        self,
        queries: Any,
        k: int,
        filter: Filter | None = None,
        params: dict[str, Any] | None = None,
        deadline_s: float | None = None,
    ) -> SearchResult:
        """Every shard's top-k, merged. `deadline_s`: shards that have not answered by then are left
        out (partial=True, missing_shards); shards in this process always answer. Default: self.deadline_s."""
        q = as_vectors(queries, self.dim, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise BadRequest(f"k must be a positive integer, got {k!r}")
        p = self._merge_params(params or {})
        return self._merged(
            "search", (q, int(k), filter, p), len(q), int(k), self.deadline_s if deadline_s is None else deadline_s
        )

    def exact_search(self, queries: Any, k: int, filter: Filter | None = None) -> SearchResult:
        q = as_vectors(queries, self.dim, "queries")
        return self._merged("exact_search", (q, int(k), filter), len(q), int(k), None)

    def _merged(self, method: str, args: tuple[Any, ...], m: int, k: int, deadline_s: float | None) -> SearchResult:
        answers, missing, version = self.shards.fan_out(method, args, deadline_s)
        if method == "search":
            self._note_missing(tuple(sorted(missing)))
        if not answers:
            if missing:  # nothing to merge: an empty 200 would pass for "no candidates"
                raise ShardsUnavailable(
                    f"no shard of the sharded index answered (shards {sorted(missing)} missing: "
                    "late or restarting); retry shortly",
                    tuple(sorted(missing)),
                )
            ids, scores = padded(m, k)
        else:
            parts = list(answers.values())
            ids, scores = merge_topk([r.ids for r in parts], [r.scores for r in parts], k)
        # a row's exact rows per shard: report the most any one shard answered exactly
        exact = max((r.exact_rows for r in answers.values()), default=0)
        short = max((r.short_rows for r in answers.values()), default=0)
        return SearchResult(
            ids=ids,
            scores=scores,
            exact_rows=exact,
            short_rows=short,
            partial=bool(missing),
            missing_shards=tuple(missing),
            version=version if version is not None else self.version,
        )

    def _note_missing(self, missing: tuple[int, ...]) -> None:
        """Keep the latest search's missing shards; log each shard leaving and coming back, once."""
        with self._transitions:
            before, self.last_missing = set(self.last_missing), missing
        for s in sorted(set(missing) - before):
            log.warning(
                "shard %d of %s did not answer within its deadline: answers leave it out until it is back",
                s,
                self.describe(),
                extra={"event": "shard_missing", "shard": s},
            )
        for s in sorted(before - set(missing)):
            log.warning("shard %d of %s answers again", s, self.describe(), extra={"event": "shard_back", "shard": s})

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory: Path) -> dict[str, Any]:
        """One complete sub-snapshot per shard under `directory`; return the top manifest's fields."""
        indexes = self.shards.local_indexes()
        if indexes is None:
            raise ConfigError(
                "the shards live on Ray workers: publish a sharded index from a local one "
                "(ShardedIndex(...).build, then index.snapshot.publish)"
            )
        directory = Path(directory)
        counts = []
        for name, shard in zip(shard_dirs(self.n_shards), indexes):
            (directory / name).mkdir()
            # the search settings the shards are served with (tuned on the whole index; every search sends
            # them too), so a shard's own manifest does not name its backend's untuned defaults
            shard.search_defaults = {**shard.search_defaults, **self.search_defaults}
            write_snapshot(shard, directory / name, SHARD_MODEL)
            counts.append(len(shard))
        return {
            "backend": KIND,
            "build_params": self.build_params,
            "description": self.describe(),
            "dim": self.dim,
            "metric": self.metric,
            "count": sum(counts),
            "slots": sum(ix.n_slots for ix in indexes),
            "search_defaults": self.search_defaults,
            "tuning": self.tuning,
            "filter_calibration": self.filter_calibration,
            "attributes": self.attribute_names,
            "backend_state": {"shards": shard_dirs(self.n_shards), "partition": shard_hash.SCHEME, "counts": counts},
        }

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> ShardedIndex:
        """Load every shard into this process (the top snapshot's checksums are checked by the caller)."""
        directory = Path(directory)
        try:
            params = dict(manifest["build_params"])
            index = cls(int(manifest["dim"]), manifest["metric"], **params)
            index.search_defaults = {**COMMON_SEARCH, **manifest["search_defaults"]}
            index.tuning, index.filter_calibration = manifest.get("tuning"), manifest.get("filter_calibration")
            state = manifest["backend_state"]
            names, scheme = list(state["shards"]), state["partition"]
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{directory}: sharded index manifest is missing or has a bad field ({e})") from e
        if scheme != shard_hash.SCHEME or names != shard_dirs(index.n_shards):
            raise ArtifactError(
                f"{directory}: shards {names} partitioned by {scheme!r}; this towerann reads "
                f"{shard_dirs(index.n_shards)} partitioned by {shard_hash.SCHEME!r}"
            )
        index.shards = LocalShards(
            [
                load_shard(directory / name, s, index.n_shards, index.backend, verify=False)
                for s, name in enumerate(names)
            ]
        )
        return index


def load_shard(directory: Path, shard: int, n_shards: int, backend: str, verify: bool = True) -> Index:
    """One shard's sub-snapshot, checked: its backend, and that every item in it hashes to this shard
    (shards put back in the wrong order would otherwise answer, and route writes, wrongly)."""
    m = read_checked_manifest(directory, verify=verify)
    if m["backend"] != backend:
        raise ArtifactError(f"{directory}: a {m['backend']} shard in a sharded snapshot of {backend} shards")
    index = backend_class(backend).load(directory, m)
    index.manifest, index.version = m, directory.parent.name
    live = load_npy(directory / "slot_ids.npy")[load_npy(directory / "slot_alive.npy")]
    wrong = live[shard_hash.shard_of(live, n_shards) != shard]
    if len(wrong):
        raise ArtifactError(
            f"{directory}: holds ids {wrong[:5].tolist()} that belong to other shards; the "
            "shard directories were moved or mixed up - republish the sharded snapshot"
        )
    return index

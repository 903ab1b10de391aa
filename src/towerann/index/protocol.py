"""The `Index` contract: what every index answers, a backend over slots (`base.SlotIndex`) or a sharded one.

Callers outside this package hold an `Index` and use only what is declared here: search, exact search
(the ground truth for recall), the writes (add, remove, availability, attributes), persistence and
a description of itself. How an index stores its items is its own business.

Contract of `search`: exactly k results per row whenever at least k items qualify (ids -1 and scores
-inf pad the rest), each row sorted by score descending; removed and unavailable items never return.
Mutations must not run concurrently with searches (the serving layer serialises them); searches may
run in parallel with each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from towerann.errors import BadRequest, ConfigError

METRICS = ("ip",)
# A filtered (or masked) search with at most this many qualifying items is answered by brute force
# over them: ~2M multiply-adds at d=128 (well under a millisecond), exact, and immune to what hurts
# filtered graph/IVF search (few qualifying items, often clustered away from the query).
# It is a search parameter of every backend ("exact_below"), so a call, a snapshot's defaults or a
# test can move it; 0 sends every masked search through the library.
EXACT_BELOW = 16384
# filter_path: "auto" (the planner decides), or one path forced ("exact", "filtered", "post");
# filter_plan: the measured (share -> path) table of towerann.index.filter_plan ([] = today's constants).
COMMON_SEARCH: dict[str, Any] = {"exact_below": EXACT_BELOW, "filter_path": "auto", "filter_plan": []}


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # int64 [m, k]; -1 padding
    scores: np.ndarray  # float32 [m, k]; -inf padding; each row sorted by score descending
    exact_rows: int = 0  # rows answered (wholly, or completed) by exact search instead of the library
    short_rows: int = 0  # of those, rows the library was asked for and came up short on
    # A sharded index may answer without some shards (a missed deadline, a shard restarting):
    # partial=True and which shards; `version` names the one snapshot version searched.
    partial: bool = False
    missing_shards: tuple[int, ...] = ()
    version: str | None = None


@dataclass(frozen=True)
class Filter:
    """Which items a search may return: AND across the conditions, OR within each value set.

    Filter(categories={3, 7}, attributes={"brand": {0}}) keeps items whose category code is 3 or 7
    *and* whose brand code is 0. Availability is always applied: unavailable/removed items are never
    returned. An item with no value for a filtered attribute (code -1) never matches it."""

    categories: frozenset[int] | None = None  # keep items whose category code is in the set
    # (name, codes) per attribute, sorted by name (a mapping is accepted and normalised): hashable,
    # so equal filters share one cached mask
    attributes: tuple[tuple[str, frozenset[int]], ...] = ()

    def __post_init__(self) -> None:
        if self.categories is not None and not isinstance(self.categories, frozenset):
            object.__setattr__(self, "categories", frozenset(int(c) for c in self.categories))
        attrs = self.attributes.items() if isinstance(self.attributes, Mapping) else self.attributes
        norm = tuple(sorted((str(name), frozenset(int(c) for c in codes)) for name, codes in attrs))
        if len({name for name, _ in norm}) != len(norm):
            raise BadRequest(f"filter: an attribute appears twice in {[n for n, _ in norm]}")
        object.__setattr__(self, "attributes", norm)

    @property
    def empty(self) -> bool:
        """No condition beyond availability."""
        return self.categories is None and not self.attributes


def as_vectors(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Check and convert to a C-contiguous float32 [n, dim] array."""
    v = np.asarray(vectors)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] != dim:
        raise BadRequest(f"{what}: expected shape [n, {dim}], got {list(np.shape(vectors))}")
    v = np.ascontiguousarray(v, dtype=np.float32)
    if not np.isfinite(v).all():
        raise BadRequest(f"{what}: contains NaN or infinite values")
    return v


class Index(ABC):
    """An index of item vectors under int64 item ids, searched by inner product.

    Holds what describes it (dim, metric, build params, search defaults, what tuning and filter
    calibration measured, the manifest and version it was loaded from); everything else is the
    implementation's."""

    kind: ClassVar[str]
    default_search: ClassVar[dict[str, Any]] = {}  # the implementation's own search parameters
    # The paths a masked search can take (search param filter_path; index.filter_plan chooses among them)
    filter_paths: tuple[str, ...] = ("exact", "filtered")

    def __init__(self, dim: int, metric: str = "ip", **build_params: Any):
        if metric not in METRICS:
            raise ConfigError(
                f"metric {metric!r} is not supported; towerann indexes use 'ip' (inner product "
                "of L2-normalised vectors)"
            )
        if int(dim) <= 0:
            raise ConfigError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.metric = metric
        self.build_params: dict[str, Any] = dict(build_params)
        self.search_defaults: dict[str, Any] = {**COMMON_SEARCH, **self.default_search}
        self.tuning: dict[str, Any] | None = None  # what tune() measured, saved with the snapshot
        self.filter_calibration: dict[str, Any] | None = None  # what filter_plan.calibrate measured, saved too
        self.manifest: dict[str, Any] | None = None  # the snapshot manifest this index was loaded from
        self.version: str | None = None  # the snapshot version it was loaded from (stamped on answers)

    # ---- search ---------------------------------------------------------------------------------
    @abstractmethod
    def search(
        self, queries: Any, k: int, filter: Filter | None = None, params: dict[str, Any] | None = None
    ) -> SearchResult:
        """Top-k items per query row under `filter`; `params` override the search defaults."""

    @abstractmethod
    def exact_search(self, queries: Any, k: int, filter: Filter | None = None) -> SearchResult:
        """Brute force over the same qualifying items: the ground truth for recall."""

    def search_space(self, k: int) -> list[dict[str, Any]]:
        """Search-parameter settings for tuning, cheapest first (one setting: nothing to tune)."""
        return [{}]

    # ---- writes ---------------------------------------------------------------------------------
    @abstractmethod
    def build(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Index a whole catalog (the index must be empty). `attributes`: {name: int codes, one per
        vector row (-1: no value)}, the filter attributes besides category."""

    @abstractmethod
    def add(
        self,
        vectors: Any,
        ids: Any,
        categories: Any = None,
        available: Any = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Add items; an id already present is replaced (its old vector is never returned again).
        An attribute the batch does not give is -1 (no value) for its items."""

    @abstractmethod
    def remove(self, ids: Any) -> None:
        """Delete items for good. Unknown ids are ignored (removal is idempotent)."""

    @abstractmethod
    def set_available(self, ids: Any, available: bool) -> None:
        """Hide (False) or show again (True) items without removing them. Unknown ids are ignored."""

    @abstractmethod
    def set_attributes(self, ids: Any, attributes: Mapping[str, Any]) -> None:
        """Change filter attributes of live items in place ({name: one code per id}; a new name is
        -1 for every other item). Unknown ids are ignored; the next search sees the change."""

    # ---- what it holds --------------------------------------------------------------------------
    @abstractmethod
    def attribute_codes(self, ids: Any) -> dict[str, np.ndarray]:
        """{attribute: int32 code per id} of live items (-1 for unknown ids or no value)."""

    @property
    @abstractmethod
    def attribute_names(self) -> list[str]:
        """The filter attributes the index holds, sorted."""

    @abstractmethod
    def __len__(self) -> int:
        """Live items (removed ones not counted; unavailable ones are)."""

    @abstractmethod
    def __contains__(self, item_id: int) -> bool:
        """The item is live (not removed; unavailable items are held)."""

    @property
    @abstractmethod
    def n_slots(self) -> int:
        """Vectors stored, dead ones included (what a rebuild would reclaim)."""

    def describe(self) -> str:
        return self.kind

    # ---- life cycle -----------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the index files into `directory` (which must exist); return the manifest fields."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> Index:
        """Rebuild an index from `save`'s files; checksums are checked by the snapshot layer."""

    def release_memory(self) -> int:
        """Hand the pages of the index's big buffers back to the kernel; return the bytes released.

        Only for an index that will never be searched again (its buffers then read as zeros): a
        swapped-out bundle's, just before it is freed. Implementations whose big arrays are
        memory-mapped files or numpy buffers release nothing here (the kernel or numpy frees them at once)."""
        return 0

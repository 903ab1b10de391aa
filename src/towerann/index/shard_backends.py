"""Where a sharded index's shards live, behind one small interface: `LocalShards` (plain `Index`
objects in this process) and `cluster.ray_shards.RayShards` (one Ray actor per shard). The
`ShardedIndex` above them only routes, fans out and merges, so both modes run the same code."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from towerann.errors import ConfigError
from towerann.index.protocol import Index

# Index methods that change a shard: a Ray shard set logs them, to replay onto a restarted worker
# and onto the next version before it is switched in.
WRITES = frozenset({"build", "add", "remove", "set_available", "set_attributes"})


def apply(index: Index, method: str, args: tuple[Any, ...]) -> Any:
    """One shard-side call: an Index method, or "stats" (what the front needs to know of a shard)."""
    if method == "stats":
        return {"count": len(index), "slots": index.n_slots, "attributes": index.attribute_names}
    return getattr(index, method)(*args)


class ShardSet(ABC):
    n: int

    @abstractmethod
    def fan_out(
        self, method: str, args: tuple[Any, ...], deadline_s: float | None = None
    ) -> tuple[dict[int, Any], tuple[int, ...], str | None]:
        """`Index.<method>(*args)` on every shard of one version: (result per shard that answered,
        shards left out, the version searched). A shard past `deadline_s` (seconds) is left out."""

    @abstractmethod
    def call(self, method: str, args: Mapping[int, tuple[Any, ...]]) -> dict[int, Any]:
        """`Index.<method>(*args[s])` on each named shard; every one must answer (a write is never partial)."""

    def local_indexes(self) -> list[Index] | None:
        """The shards' Index objects when they live in this process (save needs them), else None."""
        return None

    def switch(self, version: str) -> dict[str, Any]:
        """Serve another version of the snapshot (every shard loads and checks it first); return its manifest."""
        raise ConfigError(
            "shards in this process switch versions by loading the new snapshot as a new index "
            "(the bundle holder swaps it)"
        )


class LocalShards(ShardSet):
    """Shards in this process: what tests, small catalogs and the contract suite use."""

    def __init__(self, indexes: list[Index], version: str | None = None):
        self.indexes = indexes
        self.n = len(indexes)
        self.version = version

    def fan_out(
        self, method: str, args: tuple[Any, ...], deadline_s: float | None = None
    ) -> tuple[dict[int, Any], tuple[int, ...], str | None]:
        return {s: apply(ix, method, args) for s, ix in enumerate(self.indexes)}, (), self.version

    def call(self, method: str, args: Mapping[int, tuple[Any, ...]]) -> dict[int, Any]:
        return {s: apply(self.indexes[s], method, a) for s, a in args.items()}

    def local_indexes(self) -> list[Index] | None:
        return self.indexes

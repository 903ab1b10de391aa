"""Which shard owns an item: a fixed hash of its id, so every process (fronts, shard workers, the
index build) agrees without a lookup table, and an upsert lands on the shard that holds the old vector."""

from __future__ import annotations

from typing import Any

import numpy as np

from towerann.errors import ConfigError

SCHEME = "splitmix64"  # recorded in the manifest: a snapshot built under another scheme is refused
MAX_SHARDS = 4096


def check_shards(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_SHARDS:
        raise ConfigError(f"shards must be an integer in 1..{MAX_SHARDS}, got {n!r}")
    return int(n)


def shard_of(ids: Any, n_shards: int) -> np.ndarray:
    """Owning shard (int64) of each id: splitmix64's finaliser mod n. Consecutive ids (the usual
    catalog) spread evenly; id mod n would not when ids share a stride."""
    x = np.atleast_1d(np.asarray(ids)).astype(np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n_shards)).astype(np.int64)


def split(ids: Any, n_shards: int) -> list[np.ndarray]:
    """Row positions of `ids` per shard (each in the rows' order)."""
    owner = shard_of(ids, n_shards)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_shards + 1))
    return [order[bounds[s] : bounds[s + 1]] for s in range(n_shards)]

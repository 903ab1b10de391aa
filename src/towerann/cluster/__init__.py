"""Past one machine: a sharded index (`ShardedIndex`, an `Index`), its shards in this process or on
a Ray cluster (`ray_shards`, imported only when asked for: the core never imports ray)."""

from towerann.cluster.sharded import ShardedIndex, create_index, load_index

__all__ = ["ShardedIndex", "create_index", "load_index"]

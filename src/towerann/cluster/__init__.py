"""Past one machine, on Ray: a sharded index's shards as Ray actors (`ray_shards.RayShards`, `attach`),
the catalog embedded by Ray tasks (`ray_embed`, `towerann embed --ray`), and a local Ray cluster for tests
and benchmarks (`local_cluster`). Imported only when asked for: the core never imports ray, and neither
does importing this package (the names below are loaded from their modules on first use). The sharded
index itself (`towerann.index.sharded`, kind "sharded") needs no Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.cluster.local_cluster import LocalCluster
    from towerann.cluster.ray_embed import embed_catalog_ray
    from towerann.cluster.ray_shards import RayShards, attach

__all__ = [
    "LocalCluster",
    "RayShards",
    "attach",
    "embed_catalog_ray",
]

_MODULE_OF = {
    "LocalCluster": "local_cluster",
    "embed_catalog_ray": "ray_embed",
    "RayShards": "ray_shards",
    "attach": "ray_shards",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)

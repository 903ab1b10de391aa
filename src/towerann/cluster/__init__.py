"""Past one machine, on Ray: a sharded index's shards as Ray actors (`ray_shards.RayShards`), the
catalog embedded by Ray tasks (`ray_embed`, `towerann embed --ray`), and a local Ray cluster for tests
and benchmarks (`local_cluster`). Imported only when asked for: the core never imports ray. The
sharded index itself (`towerann.index.sharded`, kind "sharded") needs no Ray."""

"""Ray for the integration tests: skip without it (fail on CI), and one local two-node cluster at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


def import_ray() -> Any:
    """ray, or a skip (a failure when CI is set: there it must be installed)."""
    import pytest

    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed (pip install '.[ray]'); CI is set, so this is an error, not a skip")
        pytest.skip("ray is not installed (pip install '.[ray]')")
    return ray


def two_nodes(namespace: str) -> Iterator[tuple[Any, str]]:
    """(ray, address) of a head plus one node joined with `--address` (cluster.local_cluster), this
    process connected as a driver; afterwards its own processes are stopped (and no others)."""
    ray = import_ray()
    from towerann.cluster.local_cluster import LocalCluster

    local = LocalCluster(nodes=2)
    try:
        address = local.start()
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
        local.wait_for_nodes()
        yield ray, address
    finally:
        local.stop()

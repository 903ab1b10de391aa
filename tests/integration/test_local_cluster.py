"""The local Ray clusters of the tests and `bench shards` stop what they started and nothing else: a
cluster someone started by hand on the same machine (default ports, its own temp dir) survives them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from ray_cluster import import_ray

from towerann.cluster.local_cluster import LocalCluster, free_port, group_alive, ray_command, stop_groups


def _status(address: str) -> int:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [str(ray_command()), "status", f"--address={address}"], capture_output=True, env=env, timeout=120
    ).returncode


def test_a_cluster_started_outside_the_tests_survives_a_local_cluster_stopping() -> None:
    ray = import_ray()
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray-u")
    # The user's cluster: `ray start --head` as the docs give it, in a session of its own (as from a shell).
    outside = subprocess.Popen(
        [
            str(ray_command()),
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--num-cpus=1",
            "--object-store-memory=100000000",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        assert outside.wait(timeout=180) == 0, outside.stderr.read() if outside.stderr else ""
        user = f"127.0.0.1:{port}"
        assert _status(user) == 0
        local = LocalCluster(nodes=1)
        with local as address:
            assert address != user
            ray.init(address=address, namespace="towerann-test", log_to_driver=False, logging_level="ERROR")
            local.wait_for_nodes()
            assert len(ray.nodes()) == 1  # its own head, not joined to the user's
            ours = list(local.groups)
        assert not ray.is_initialized() and not any(group_alive(g) for g in ours)  # ours is gone
        assert group_alive(outside.pid) and _status(user) == 0  # theirs still runs and answers
    finally:
        stop_groups([outside.pid])
        shutil.rmtree(temp, ignore_errors=True)

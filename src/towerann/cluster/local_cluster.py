"""A Ray cluster of several nodes on this machine, started with the same `ray start` commands as on
several machines (docs/shards.md): a head, then nodes that join it with `--address`. Small by
default (1 CPU and a 300 MB object store per node), for tests and `towerann bench shards`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from towerann.errors import BackendUnavailable

OBJECT_STORE_BYTES = 300_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_command() -> Path:
    """The `ray` script beside this interpreter (so nodes run this venv's Python and towerann)."""
    exe = Path(sys.executable).parent / "ray"
    if not exe.exists():
        raise BackendUnavailable(f"{exe} not found; pip install 'towerann[ray]'")
    return exe


def node_args(num_cpus: int = 1, object_store_bytes: int = OBJECT_STORE_BYTES) -> list[str]:
    return [f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats"]


class LocalCluster:
    """with LocalCluster(nodes=2) as address: ...  (stops every node with `ray stop --force` on exit:
    that stops all Ray processes of this machine, so run one at a time)."""

    def __init__(self, nodes: int = 2, num_cpus: int = 1, object_store_bytes: int = OBJECT_STORE_BYTES):
        self.nodes, self.args = nodes, node_args(num_cpus, object_store_bytes)
        self.address: str | None = None
        self.temp: str | None = None
        # no usage stats; no metrics export (core Ray has no metrics agent: each process would log its absence)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}

    def _ray(self, *args: str) -> None:
        done = subprocess.run([str(ray_command()), *args], capture_output=True, text=True, env=self.env, timeout=180)
        if done.returncode != 0:
            raise BackendUnavailable(f"ray {args[0]} {args[1]} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> str:
        port = _free_port()
        self.temp = tempfile.mkdtemp(prefix="ray-t")  # short: Ray's socket paths must fit in 107 bytes
        self._ray("start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                  *self.args)
        self.address = f"127.0.0.1:{port}"
        for _ in range(self.nodes - 1):
            self._ray("start", f"--address={self.address}", *self.args)
        return self.address

    def wait_for_nodes(self, timeout_s: float = 60.0) -> None:
        """After ray.init: until every node has joined."""
        import ray

        deadline = time.monotonic() + timeout_s
        while sum(n["Alive"] for n in ray.nodes()) < self.nodes:
            if time.monotonic() > deadline:
                raise BackendUnavailable(f"only {sum(n['Alive'] for n in ray.nodes())} of {self.nodes} Ray nodes joined")
            time.sleep(0.2)

    def stop(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            subprocess.run([str(ray_command()), "stop", "--force"], capture_output=True, env=self.env, timeout=180)
            if self.temp:
                shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

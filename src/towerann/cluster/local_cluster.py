"""A Ray cluster of several nodes on this machine, started with the same `ray start` commands as on
several machines (docs/shards.md): a head, then nodes that join it with `--address`. Small by
default (1 CPU and a 300 MB object store per node), for tests and `towerann bench shards`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from towerann.errors import BackendUnavailable

OBJECT_STORE_BYTES = 300_000_000


def free_port() -> int:
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
    """with LocalCluster(nodes=2) as address: ...

    Each `ray start` runs in a process group of its own, which its daemons (and their workers) keep;
    stop() ends those groups and nothing else. (`ray stop --force` would end every Ray process of
    the machine, a user's own cluster included.)"""

    def __init__(self, nodes: int = 2, num_cpus: int = 1, object_store_bytes: int = OBJECT_STORE_BYTES):
        self.nodes, self.args = nodes, node_args(num_cpus, object_store_bytes)
        self.address: str | None = None
        self.temp: str | None = None
        self.groups: list[int] = []  # the process groups of our `ray start`s: everything they started
        # no usage stats; no metrics export (core Ray has no metrics agent: each process would log its absence)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}

    def _ray(self, *args: str) -> None:
        proc = subprocess.Popen(
            [str(ray_command()), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self.groups.append(proc.pid)  # the daemons stay in this group after `ray start` exits
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            raise BackendUnavailable(f"ray {args[0]} {args[1]} failed: {err.strip()[-500:]}")

    def start(self) -> str:
        port = free_port()
        self.temp = tempfile.mkdtemp(prefix="ray-t")  # short: Ray's socket paths must fit in 107 bytes
        # Ports of our own where Ray's defaults are fixed numbers (8265, 52365), so that a cluster
        # already running on this machine neither blocks this one nor gets talked to by it.
        self._ray(
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--temp-dir={self.temp}",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            *self.args,
        )
        self.address = f"127.0.0.1:{port}"
        for _ in range(self.nodes - 1):
            self._ray("start", f"--address={self.address}", f"--dashboard-agent-listen-port={free_port()}", *self.args)
        return self.address

    def wait_for_nodes(self, timeout_s: float = 60.0) -> None:
        """After ray.init: until every node has joined."""
        import ray

        deadline = time.monotonic() + timeout_s
        while sum(n["Alive"] for n in ray.nodes()) < self.nodes:
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"only {sum(n['Alive'] for n in ray.nodes())} of {self.nodes} Ray nodes joined"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            stop_groups(self.groups)
            self.groups = []
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


def group_alive(group: int) -> bool:
    """Does any process of this process group still exist (a zombie counts until it is reaped)?"""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a group of another user's: not ours
        return False
    return True


def stop_groups(groups: list[int], grace_s: float = 2.0) -> None:
    """SIGTERM every process of these process groups, then SIGKILL what is left after `grace_s` (Ray's
    gcs_server and raylets outlast a SIGTERM for seconds; `ray stop --force` sends SIGKILL at once)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            if group_alive(group):
                os.killpg(group, sig)
        deadline = time.monotonic() + grace_s
        while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.1)

"""The shards of a sharded index on a Ray cluster: one actor per shard, holding its sub-snapshot.

    index = attach("indexes/", address="127.0.0.1:6379")   # a ShardedIndex; searches fan out to the actors
    index.search(q, 100, deadline_s=0.05)                    # late or dead shards: partial=True, missing_shards
    index.switch("<new version>")                            # load + check on every shard, then switch

Why plain actors, not Ray Serve: a search is one call per shard for the whole query batch, and a
Serve deployment adds an HTTP/handle hop and a router per call on top of the actor call this needs
(docs/shards.md has the measured fan-out costs, compiled graphs included).

Versions: an actor holds the versions it was told to load (the current one and the one before, so
a search already sent with the old version still finds it); every call names its version, and a
shard that does not hold it fails that call, so one search never merges two versions. A switch
loads and checks the new version on every shard first and replays the writes this front has made,
then moves the front's version in one assignment.

Faults: actors restart by themselves (max_restarts=-1) and their constructor loads the root's
CURRENT snapshot; the front notices the new incarnation (every answer carries it) or a failed
call, and a background thread brings the shard to the front's version and replays the writes the
front logged for it, leaving the shard out of searches (partial) until then.

Ray is imported here only (lazily, through `require_ray`): the core never imports it.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from towerann.errors import ArtifactError, BackendUnavailable, ConfigError, TowerannError
from towerann.index import Index
from towerann.index.shard_backends import WRITES, ShardSet, apply
from towerann.index.sharded import KIND, SHARD_DIR, ShardedIndex, load_shard
from towerann.index.snapshot import current_version, read_checked_manifest

log = logging.getLogger(__name__)

INLINE_BYTES = 64 * 1024  # below Ray's own inline limit (100 KiB)
RECOVER_WAIT_S = 120.0  # how long a recovery thread waits for a restarting actor before giving up


class ShardVersionMissing(ArtifactError):
    """A shard was asked for a version it does not hold (restarted, or not yet switched)."""


def require_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailable("ray is not installed; pip install 'towerann[ray]'") from e
    return ray


def top_manifest(root: Path, version: str) -> dict[str, Any]:
    """The sharded snapshot's own manifest (structure only: each shard checks its own files' checksums)."""
    m = read_checked_manifest(root / version, verify=False)
    if m["backend"] != KIND:
        raise ConfigError(
            f"{root / version}: a {m['backend']} snapshot; the Ray shards serve sharded snapshots "
            "(build with --kind sharded)"
        )
    return m


class ShardWorker:
    """One shard: the actor's class (Ray wraps it in RayShards)."""

    def __init__(self, root: str, shard: int, n_shards: int):
        self.root, self.shard, self.n_shards = Path(root), int(shard), int(n_shards)
        self.incarnation = secrets.token_hex(6)  # new on every (re)start: the front replays writes when it changes
        self.held: dict[str, Index] = {}
        self.current: str | None = None
        try:
            version = current_version(self.root)
        except ArtifactError:
            return  # nothing published yet: the front loads a version when it attaches
        self.load(version)
        self.current = version

    def load(self, version: str) -> dict[str, Any]:
        """Load and check this shard's part of `version` (idempotent)."""
        if version not in self.held:
            m = top_manifest(self.root, version)
            if int(m["build_params"]["shards"]) != self.n_shards:
                raise ArtifactError(
                    f"{self.root / version}: {m['build_params']['shards']} shards, the cluster runs {self.n_shards}"
                )
            index = load_shard(
                self.root / version / SHARD_DIR.format(self.shard),
                self.shard,
                self.n_shards,
                m["build_params"]["backend"],
            )
            expected = m["backend_state"]["counts"][self.shard]
            if len(index) != expected:
                raise ArtifactError(
                    f"{self.root / version}: shard {self.shard} holds {len(index)} items, the manifest says {expected}"
                )
            self.held[version] = index
        return self.info()

    def switch(self, version: str) -> dict[str, Any]:
        """Make `version` current; keep it and the one before (searches in flight may still name that)."""
        if version not in self.held:
            raise ShardVersionMissing(f"shard {self.shard}: version {version} is not loaded")
        if version != self.current:  # (a recovery re-switches to the current one: nothing to drop)
            previous, self.current = self.current, version
            for v in set(self.held) - {version, previous}:
                del self.held[v]
        return self.info()

    def drop(self, version: str) -> None:
        if version != self.current:
            self.held.pop(version, None)

    def call(self, version: str, method: str, args: tuple) -> tuple[str, Any]:
        index = self.held.get(version)
        if index is None:
            raise ShardVersionMissing(f"shard {self.shard} holds versions {sorted(self.held)}, not {version}")
        return self.incarnation, apply(index, method, args)

    def replay(self, version: str, writes: list[tuple[str, tuple]]) -> int:
        for method, args in writes:
            self.call(version, method, args)
        return len(writes)

    def info(self) -> dict[str, Any]:
        node = require_ray().get_runtime_context().get_node_id()
        return {
            "shard": self.shard,
            "incarnation": self.incarnation,
            "current": self.current,
            "held": sorted(self.held),
            "node": node,
            "pid": os.getpid(),
            "count": len(self.held[self.current]) if self.current in self.held else 0,
        }

    def noop(self, x: Any) -> Any:
        """For measuring the bare cost of a call (bench shards)."""
        return x


class ShardMetrics:
    """Per shard: calls, errors, late answers, items, and latency of the answers (for /metrics or a bench)."""

    def __init__(self, n: int):
        self.calls, self.errors, self.late = [0] * n, [0] * n, [0] * n
        self.seconds = [0.0] * n

    def as_dict(self) -> list[dict[str, Any]]:
        # fanout_ms: the mean wait of the fan-outs this shard answered in (its own time or a slower shard's)
        return [
            {
                "shard": s,
                "calls": self.calls[s],
                "errors": self.errors[s],
                "late": self.late[s],
                "fanout_ms": round(1e3 * self.seconds[s] / max(self.calls[s] - self.errors[s] - self.late[s], 1), 3),
            }
            for s in range(len(self.calls))
        ]


class RayShards(ShardSet):
    """One Ray actor per shard; this process only routes, fans out and merges."""

    def __init__(
        self,
        root: str | Path,
        n_shards: int,
        name: str = "towerann",
        detached: bool = False,
        version: str | None = None,
    ):
        ray = require_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.root, self.n = Path(root).resolve(), int(n_shards)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        worker = ray.remote(ShardWorker)
        # Shards round-robin over the nodes. Hard affinity: soft placement put two shards on one node
        # now and then although the other was free; the cost is that a shard whose node died stays
        # missing (partial answers) until the front attaches again. num_cpus=0: a shard is mostly
        # idle between searches, and the nodes are small.
        self.actors = [
            worker.options(
                name=f"{name}-shard-{s}",
                get_if_exists=True,
                lifetime="detached" if detached else None,
                max_restarts=-1,
                max_task_retries=0,
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[s % len(nodes)], soft=False),
            ).remote(str(self.root), s, self.n)
            for s in range(self.n)
        ]
        self.version: str = version or current_version(self.root)
        self.dim = int(top_manifest(self.root, self.version)["dim"])
        infos = ray.get([a.load.remote(self.version) for a in self.actors])
        self.incarnations = [i["incarnation"] for i in infos]
        self.nodes = [i["node"] for i in infos]
        self.writes: list[list[tuple[str, tuple]]] = [[] for _ in range(self.n)]  # per shard, in order
        self.metrics = ShardMetrics(self.n)
        self._lock = threading.RLock()  # writes, switches and recoveries run one at a time
        self._recovering: set[int] = set()

    # ---- searches -------------------------------------------------------------------------------
    def fan_out(
        self, method: str, args: tuple, deadline_s: float | None = None
    ) -> tuple[dict[int, Any], tuple[int, ...], str | None]:
        ray = require_ray()
        version = self.version  # read once: every shard is asked for this one version
        start = time.perf_counter()
        # A big batch is serialised once into the object store for every shard to read; a few queries
        # go inline with each call (a put costs an object-store round trip, ~ms, that they do not need).
        payload = ray.put(args) if sum(getattr(a, "nbytes", 0) for a in args) > INLINE_BYTES else args
        asked = {
            s: a.call.remote(version, method, payload) for s, a in enumerate(self.actors) if s not in self._recovering
        }
        refs = list(asked.values())
        if deadline_s is None or not refs:
            ready = refs
        else:
            ready = ray.wait(refs, num_returns=len(refs), timeout=deadline_s)[0]
        try:
            got = dict(zip(ready, ray.get(ready)))  # one round trip when every shard answered
        except ray.exceptions.RayError:
            got = {}  # some shard failed: each on its own below
        done = set(ready)
        elapsed = time.perf_counter() - start
        answers: dict[int, Any] = {}
        missing = [s for s in range(self.n) if s not in asked]
        for s, ref in asked.items():
            self.metrics.calls[s] += 1
            if ref not in done:
                self.metrics.late[s] += 1
                missing.append(s)
                continue
            try:
                incarnation, value = got[ref] if ref in got else ray.get(ref)
            except ray.exceptions.RayError as e:
                self._failed(s, version, e)
                missing.append(s)
                continue
            if incarnation != self.incarnations[s]:  # restarted: its answer lacks this front's writes
                self._recover(s, version)
                missing.append(s)
                continue
            self.metrics.seconds[s] += elapsed
            answers[s] = value
        return answers, tuple(sorted(missing)), version

    def _failed(self, s: int, version: str, error: Exception) -> None:
        cause = getattr(error, "cause", None)
        if isinstance(cause, TowerannError) and not isinstance(cause, ShardVersionMissing):
            raise cause  # a bad request is the caller's, not the shard's fault
        self.metrics.errors[s] += 1
        log.warning("shard %d failed (%s); left out until it recovers", s, type(cause or error).__name__)
        self._recover(s, version)

    def _recover(self, s: int, version: str) -> None:
        """In the background: wait for the actor, load the front's version, replay the logged writes."""
        with self._lock:
            if s in self._recovering:
                return
            self._recovering.add(s)
        threading.Thread(target=self._bring_back, args=(s,), name=f"shard-{s}-recovery", daemon=True).start()

    def _bring_back(self, s: int) -> None:
        ray = require_ray()
        deadline = time.monotonic() + RECOVER_WAIT_S
        try:
            while True:
                try:
                    with self._lock:
                        version = self.version
                        info = ray.get(self.actors[s].load.remote(version), timeout=30)
                        ray.get(self.actors[s].replay.remote(version, list(self.writes[s])), timeout=60)
                        ray.get(self.actors[s].switch.remote(version), timeout=30)
                        self.incarnations[s], self.nodes[s] = info["incarnation"], info["node"]
                    log.info(
                        "shard %d back (incarnation %s, version %s, %d writes replayed)",
                        s,
                        info["incarnation"],
                        version,
                        len(self.writes[s]),
                    )
                    return
                except ray.exceptions.RayError as e:
                    if time.monotonic() > deadline:
                        log.error("shard %d did not come back within %.0f s (%s)", s, RECOVER_WAIT_S, e)
                        return
                    time.sleep(0.2)
        finally:
            self._recovering.discard(s)

    # ---- targeted calls (writes, stats) ---------------------------------------------------------
    def call(self, method: str, args: Mapping[int, tuple]) -> dict[int, Any]:
        ray = require_ray()
        with self._lock:
            version = self.version
            refs = {s: self.actors[s].call.remote(version, method, a) for s, a in args.items()}
            out, failed = {}, []
            for s, ref in refs.items():
                try:
                    out[s] = ray.get(ref)[1]
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, TowerannError) and not isinstance(cause, ShardVersionMissing):
                        raise cause from e
                    failed.append(s)
                    continue
                if method in WRITES:
                    self.writes[s].append((method, args[s]))
            if failed:
                for s in failed:
                    self._recover(s, version)
                raise BackendUnavailable(
                    f"shards {failed} did not answer {method}; they are recovering - retry (writes are idempotent)"
                )
            return out

    # ---- versions -------------------------------------------------------------------------------
    def switch(self, version: str) -> dict[str, Any]:
        """Load and check `version` on every shard, replay this front's writes onto it, then switch;
        return its top manifest. On any failure nothing is switched."""
        ray = require_ray()
        manifest = top_manifest(self.root, version)
        if int(manifest["dim"]) != self.dim:
            raise ArtifactError(f"{self.root / version}: dim {manifest['dim']}; this index serves dim {self.dim}")
        if int(manifest["build_params"]["shards"]) != self.n:
            raise ArtifactError(
                f"{self.root / version}: {manifest['build_params']['shards']} shards; this cluster "
                f"serves {self.n} (start a new set of shard workers for another shard count)"
            )
        with self._lock:
            try:
                infos = ray.get([a.load.remote(version) for a in self.actors])
                ray.get([a.replay.remote(version, list(self.writes[s])) for s, a in enumerate(self.actors)])
            except ray.exceptions.RayError as e:
                for a in self.actors:
                    a.drop.remote(version)
                raise ArtifactError(
                    f"version {version} was not switched in: a shard could not load it "
                    f"({getattr(e, 'cause', None) or e})"
                ) from e
            self.version = version  # from here on every search names the new version
            self.incarnations = [i["incarnation"] for i in infos]
            for s, ref in enumerate([a.switch.remote(version) for a in self.actors]):
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:  # restarted since its load: it catches up by itself
                    self._failed(s, version, e)
        return manifest

    def info(self) -> list[dict[str, Any]]:
        return require_ray().get([a.info.remote() for a in self.actors])

    def recovering(self) -> tuple[int, ...]:
        """Shards left out of searches until they are back (restarted, catching up on this front's writes)."""
        return tuple(sorted(self._recovering))

    def close(self) -> None:
        """Stop this set's shard actors for good (no restart)."""
        ray = require_ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)


def attach(
    root: str | Path,
    address: str | None = None,
    name: str = "towerann",
    detached: bool = False,
    namespace: str = "towerann",
    version: str | None = None,
    deadline_s: float | None = None,
) -> ShardedIndex:
    """A ShardedIndex over Ray actors serving `version` (default: the CURRENT one) of the sharded
    snapshot root `root` (a path every node can read). Connects to the cluster at `address` unless
    already connected. `deadline_s`: how long a search waits for the shards unless it says otherwise."""
    root = Path(root).resolve()
    version = version or current_version(root)
    manifest = top_manifest(root, version)  # a snapshot that is not sharded is refused before Ray is reached
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=namespace, log_to_driver=False, logging_level="WARNING")
    shards = RayShards(root, int(manifest["build_params"]["shards"]), name=name, detached=detached, version=version)
    index = ShardedIndex.over(shards, manifest)
    index.version, index.deadline_s = shards.version, deadline_s
    return index

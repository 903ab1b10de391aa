"""Re-tune a published snapshot's search settings without rebuilding it (`towerann index tune`).

The tuner picks the fastest setting reaching a recall target *as measured on the machine it ran on*:
a build on a busy machine (or for another K, recall target or server type) can pick a setting that is
wrong for the serving machine. Re-tuning loads the current version,
measures again (`index.tune`; the filter plan too when the snapshot has one, since its paths run at
the new setting), and publishes a new version: the same data files as hard links, a new manifest. A
rebuild of 10M items takes about half an hour; this takes minutes, and a running server picks the new
version up on its next reload like any other.

Live queries (`towerann index tune ROOT --from-live`): a server keeps a reservoir of the query vectors of
live requests it sampled (serving.monitor.LiveQueries: the vector, the request's k and filter, when it came;
never a user id) and writes it under the root it serves, one directory per writing process:

    ROOT/live_queries/<writer>/queries.npy    float32 [n, dim]
                             /filters.json   [{"k": 10, "filter": null | {"categories": [...], ...}, "ts": 1700000000}]
                             /manifest.json  kind "live_queries": writer, model_version, dim, count, seen, checksums

each directory written whole under a temporary name and renamed into place (a reader sees the old one or
the new one). Several worker processes each write their own directory; readers merge them. Re-tuning on
them uses every vector as an unfiltered query: the search settings are what tuning sets, and the filter
plan, when the snapshot has one, is measured again on its own masks (filter_plan.calibrate).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import MANIFEST, atomic_dir, load_npy, read_manifest, save_npy, sha256_file, write_manifest
from towerann.errors import ArtifactError, ConfigError
from towerann.index.filter_plan import calibrate
from towerann.index.snapshot import CURRENT, load_snapshot, read_checked_manifest, republish, resolve
from towerann.index.tune import tune

log = logging.getLogger(__name__)

LIVE_QUERIES = "live_queries"  # under a snapshot root: one directory per writing process
LIVE_KIND = "live_queries"
LIVE_FORMAT = 1
QUERIES_FILE, FILTERS_FILE = "queries.npy", "filters.json"
RECORD_KEYS = frozenset({"k", "filter", "ts"})  # all a live query keeps besides its vector: no user, no request id
MIN_LIVE_QUERIES = 100  # `index tune --from-live` refuses a smaller reservoir


def retune(
    root: str | Path,
    queries: np.ndarray,
    k: int,
    recall: float,
    keep: int = 3,
    calibrate_filters: bool | None = None,
    reason: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Tune the CURRENT version of snapshot root `root` again on `queries` (user-tower vectors) to
    `recall` at `k` and publish the result as a new version. calibrate_filters None: re-measure the
    filter plan when the snapshot has one. `reason`: why, recorded in the manifest (retune_reason).
    Returns (the new version's path, the tuning result)."""
    root = Path(root)
    if not (root / CURRENT).exists():
        raise ConfigError(
            f"{root}: not a snapshot root (no {CURRENT}); give the directory that `index build --out` "
            "or `serve --index` names"
        )
    source = resolve(root)
    index = load_snapshot(source)
    if index.kind == "exact":
        raise ConfigError(f"{source}: an exact index has no search settings to tune")
    manifest = dict(index.manifest or {})  # load_snapshot always sets it
    # Settings the old tuning chose go; explicit settings given at build time (and exact_below) stay.
    for key in (index.tuning or {}).get("params", {}):
        index.search_defaults.pop(key, None)
    result = tune(index, queries, k, recall)
    if calibrate_filters is None:
        calibrate_filters = manifest.get("filter_calibration") is not None
    if calibrate_filters:  # else the old plan stays: its paths still exist, its thresholds may be off
        calibrate(index, queries, ks=(k,), target=recall)
    manifest.update(
        search_defaults=index.search_defaults,
        tuning=index.tuning,
        filter_calibration=index.filter_calibration,
        retuned_from=source.name,
    )
    if reason:
        manifest["retune_reason"] = reason
    path = republish(root, source, manifest, keep=keep)
    log.info(
        "re-tuned %s: %s (recall@%d %.4f, p50 %s ms) -> %s",
        source.name,
        result["params"],
        k,
        result["recall"],
        result["p50_ms"],
        path.name,
    )
    return path, result


# ---- live queries: the reservoir a server writes under the root it serves ----------------------------


@dataclass(frozen=True)
class LiveQuerySet:
    """Live queries as read back: vectors [n, dim], one record per row ({"k", "filter", "ts"}), and the
    writers (directories) they came from."""

    vectors: np.ndarray
    records: list[dict[str, Any]]
    writers: tuple[str, ...] = ()
    model_version: str | None = None

    def __len__(self) -> int:
        return len(self.vectors)


def write_live_queries(
    root: str | Path, writer: str, vectors: np.ndarray, records: list[dict[str, Any]], meta: dict[str, Any]
) -> Path:
    """Write one writer's reservoir as ROOT/live_queries/<writer>/, whole: a temporary directory renamed
    over the old one. `records` hold only RECORD_KEYS (refused otherwise: nothing else may be stored);
    `meta` adds to the manifest (model_version, seen, size). Returns the directory."""
    if not writer or "/" in writer or writer.startswith("."):
        raise ConfigError(f"live queries: writer name {writer!r} is not a plain directory name")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(records) != len(vectors):
        raise ArtifactError(f"live queries: {len(records)} records for vectors of shape {list(vectors.shape)}")
    extra = {key for r in records for key in r} - RECORD_KEYS
    if extra:
        raise ArtifactError(f"live queries: records may hold only {sorted(RECORD_KEYS)}, not {sorted(extra)}")
    target = Path(root) / LIVE_QUERIES / writer
    with atomic_dir(target, overwrite=True) as tmp:
        save_npy(tmp / QUERIES_FILE, vectors)
        (tmp / FILTERS_FILE).write_text(json.dumps(records, sort_keys=True, separators=(",", ":")))
        write_manifest(
            tmp / MANIFEST,
            {
                **meta,
                "kind": LIVE_KIND,
                "format_version": LIVE_FORMAT,
                "writer": writer,
                "dim": int(vectors.shape[1]),
                "count": len(vectors),
                "saved_at": int(time.time()),
                "checksums": {name: sha256_file(tmp / name) for name in (QUERIES_FILE, FILTERS_FILE)},
            },
        )
    return target


def read_live_writer(directory: str | Path) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """One writer's reservoir, checked: its manifest (kind, format, own checksum), the files' checksums,
    the shapes, and that the records hold nothing but RECORD_KEYS. Returns (manifest, vectors, records)."""
    directory = Path(directory)
    m = read_manifest(directory, LIVE_KIND, LIVE_FORMAT)
    sums = m.get("checksums")
    if not isinstance(sums, dict) or set(sums) != {QUERIES_FILE, FILTERS_FILE}:
        raise ArtifactError(f"{directory / MANIFEST}: checksums of {QUERIES_FILE} and {FILTERS_FILE} missing")
    vectors = load_npy(directory / QUERIES_FILE, expected_sha256=sums[QUERIES_FILE])
    if sha256_file(directory / FILTERS_FILE) != sums[FILTERS_FILE]:
        raise ArtifactError(f"{directory / FILTERS_FILE}: checksum mismatch (file corrupted or replaced)")
    try:
        records = json.loads((directory / FILTERS_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{directory / FILTERS_FILE}: not valid JSON ({e})") from e
    if (
        vectors.dtype != np.float32
        or vectors.ndim != 2
        or vectors.shape != (m.get("count"), m.get("dim"))
        or not isinstance(records, list)
        or len(records) != len(vectors)
        or not all(isinstance(r, dict) and set(r) <= RECORD_KEYS for r in records)
    ):
        raise ArtifactError(f"{directory}: the live queries do not match their manifest; they are ignored")
    return m, vectors, records


def read_live_queries(
    root: str | Path,
    model_version: str | None = None,
    max_age_s: float | None = None,
    skip: str | None = None,
    now: float | None = None,
    strict: bool = True,
) -> LiveQuerySet:
    """Every writer's live queries under snapshot root `root`, merged: those of `model_version` (queries
    of another user tower are of another vector space: left out, and logged), younger than `max_age_s`,
    and not of writer `skip` (a server merges its own from memory). No reservoir: an empty set. A writer's
    directory that fails its checks raises ArtifactError, or with `strict` False is left out and logged."""
    base = Path(root) / LIVE_QUERIES
    now = time.time() if now is None else now
    parts: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    writers: list[str] = []
    dims: set[int] = set()
    found = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []
    for directory in found:
        if directory.name == skip or not (directory / MANIFEST).exists():
            continue
        try:
            m, vectors, recs = read_live_writer(directory)
        except ArtifactError as e:
            if strict:
                raise
            log.warning("live queries of %s left out: %s", directory, e)
            continue
        if model_version is not None and m.get("model_version") != model_version:
            log.info(
                "live queries of %s are from model %r, not %r: left out",
                directory,
                m.get("model_version"),
                model_version,
            )
            continue
        keep = np.ones(len(recs), bool)
        if max_age_s is not None:
            keep = np.array([now - float(r.get("ts", 0)) <= max_age_s for r in recs], bool).reshape(-1)
        parts.append(vectors[keep])
        records += [r for r, kept in zip(recs, keep) if kept]
        writers.append(directory.name)
        dims.add(int(vectors.shape[1]))
    if len(dims) > 1:
        raise ArtifactError(f"{base}: writers hold queries of different dims {sorted(dims)}; remove the stale ones")
    dim = dims.pop() if dims else 0
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return LiveQuerySet(vectors, records, tuple(writers), model_version)


def retune_from_live(
    root: str | Path,
    k: int,
    recall: float | None = None,
    keep: int = 3,
    calibrate_filters: bool | None = None,
    min_queries: int = MIN_LIVE_QUERIES,
) -> tuple[Path, dict[str, Any], int]:
    """`towerann index tune ROOT --from-live`: re-tune the CURRENT version on the live queries a server
    saved under ROOT (every writer's, of the version's model), each as an unfiltered query, to `recall`
    (default: the version's own tuned target) at `k`. Returns (new version path, tuning result, queries used)."""
    root = Path(root)
    if not (root / CURRENT).exists():
        raise ConfigError(f"{root}: not a snapshot root (no {CURRENT}); --from-live reads ROOT/{LIVE_QUERIES}/")
    m = read_checked_manifest(resolve(root), verify=False)
    tuned = m.get("tuning") or {}
    recall = recall if recall is not None else tuned.get("target")
    if recall is None:
        raise ConfigError(f"{resolve(root)} has no tuning record to take the target from: give --recall")
    if not (root / LIVE_QUERIES).is_dir():
        raise ConfigError(
            f"{root}: no live queries ({LIVE_QUERIES}/ missing): a server serving this root with [monitor] "
            "sample > 0 and reservoir > 0 writes them; or give --queries FILE"
        )
    live = read_live_queries(root, model_version=str(m["model_version"]))
    if len(live) < min_queries:
        raise ConfigError(
            f"{root}: {len(live)} live queries of model {m['model_version']!r} under {LIVE_QUERIES}/, "
            f"--from-live needs at least {min_queries}; let the server sample more, or give --queries FILE"
        )
    reason = f"live queries: {len(live)} from {', '.join(live.writers)}"
    path, result = retune(root, live.vectors, int(k), float(recall), keep, calibrate_filters, reason=reason)
    return path, result, len(live)

"""Index snapshots: `root/<version>/` directories with a checked manifest, and an atomic CURRENT pointer.

A serving process loads `root/CURRENT`; publishing writes a whole new version directory first
(atomic_dir) and only then swaps the pointer (temp file + os.replace), so a reader sees either
the old snapshot or the new one, never a half-written one. Old versions are pruned to `keep`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from towerann.artifacts import MANIFEST, atomic_dir, fsync_path, read_manifest, sha256_file, write_manifest
from towerann.errors import ArtifactError, IndexIncompatible
from towerann.index.protocol import Index

log = logging.getLogger(__name__)

KIND = "index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"


def new_version() -> str:
    """UTC timestamp + random suffix: sorts by creation time, unique across concurrent publishers."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_snapshot(
    index: Index, directory: Path, model_version: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write index files + manifest.json (with a checksum of every file) into an existing, empty directory."""
    directory = Path(directory)
    manifest = index.save(directory)
    manifest.update(
        {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "model_version": str(model_version),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "checksums": {name: sha256_file(directory / name) for name in _files(directory)},
        }
    )
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ArtifactError(f"extra manifest field {key!r} would overwrite a field the index writes; rename it")
        manifest[key] = value
    write_manifest(directory / MANIFEST, manifest)
    return manifest


def publish(
    index: Index,
    root: str | Path,
    model_version: str,
    extra: dict[str, Any] | None = None,
    keep: int = 3,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a new snapshot version under `root`, point CURRENT at it, prune old versions; return its path.

    `add_files(tmp)` may write more files into the version directory before the manifest lists and
    checksums them (a retrieval bundle adds its model and id map this way)."""
    root = Path(root)
    version = new_version()
    try:
        with atomic_dir(root / version) as tmp:
            if add_files is not None:
                add_files(tmp)
            write_snapshot(index, tmp, model_version, extra)
    except (OSError, RuntimeError) as e:  # disk full, a file size limit, faiss failing to write: nothing landed
        raise ArtifactError(
            f"{root}: could not write snapshot {version} ({e}); nothing was published, CURRENT "
            "is unchanged - free space and publish again"
        ) from e
    set_current(root, version)
    prune(root, keep)
    log.info("published index snapshot %s (%s, %d items)", root / version, index.describe(), len(index))
    return root / version


def republish(root: str | Path, source: str | Path, manifest: dict[str, Any], keep: int = 3) -> Path:
    """Publish a new version under `root` holding `source`'s files (hard links: artifacts are never
    written in place, so sharing them is safe; copies across filesystems) and `manifest` in place of
    its manifest - a change of search settings without a rebuild. CURRENT moves to it; returns its path."""
    root, source = Path(root), Path(source)
    version = new_version()
    try:
        with atomic_dir(root / version) as tmp:
            # every file but the top manifest (model/manifest.json and sub-snapshots' manifests included)
            for name in sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()):
                if name == MANIFEST:
                    continue
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source / name, tmp / name)
                except OSError:
                    shutil.copy2(source / name, tmp / name)
            write_manifest(tmp / MANIFEST, {**manifest, "created_at": dt.datetime.now(dt.UTC).isoformat()})
    except OSError as e:
        raise ArtifactError(
            f"{root}: could not write snapshot {version} ({e}); nothing was published, CURRENT is unchanged"
        ) from e
    set_current(root, version)
    prune(root, keep)
    log.info("republished %s as %s", source, root / version)
    return root / version


def set_current(root: str | Path, version: str) -> None:
    """Point root/CURRENT at `version`, atomically (temp file + rename, both flushed to disk)."""
    root = Path(root)
    fd, tmp = tempfile.mkstemp(prefix=f".{CURRENT}.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / CURRENT)
        fsync_path(root)  # the rename itself
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_versions(root: str | Path) -> list[str]:
    """Complete snapshot versions under `root`, oldest first (temp dirs of unfinished publishes are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()
    )


def current_version(root: str | Path) -> str:
    path = Path(root) / CURRENT
    if not path.exists():
        raise ArtifactError(f"{path}: missing; {root} holds no published index (run `towerann index build`)")
    version = path.read_text().strip()
    if not version or not (Path(root) / version / MANIFEST).exists():
        raise ArtifactError(f"{path}: points at {version!r}, which is not a complete snapshot under {root}")
    return version


def prune(root: str | Path, keep: int = 3) -> list[str]:
    """Delete all but the newest `keep` versions, never the current one; return what was deleted."""
    root = Path(root)
    current = current_version(root)
    versions = list_versions(root)
    doomed = [v for v in versions[: max(0, len(versions) - max(keep, 1))] if v != current]
    for v in doomed:
        shutil.rmtree(root / v, ignore_errors=True)
    return doomed


def rollback(root: str | Path) -> str:
    """Point CURRENT at the version before the current one; return that version."""
    root = Path(root)
    current = current_version(root)
    older = [v for v in list_versions(root) if v < current]
    if not older:
        raise ArtifactError(f"{root}: no version older than {current} to roll back to")
    set_current(root, older[-1])
    log.info("rolled back %s: %s -> %s", root, current, older[-1])
    return older[-1]


def resolve(directory: str | Path) -> Path:
    """A snapshot directory itself, or the CURRENT version of a root of snapshots."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        return directory
    if (directory / CURRENT).exists():
        return directory / current_version(directory)
    raise ArtifactError(f"{directory}: neither an index snapshot (no {MANIFEST}) nor a snapshot root (no {CURRENT})")


def read_checked_manifest(
    directory: str | Path,
    expected_model_version: str | None = None,
    expected_dim: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Read and check a snapshot's manifest: format, pairing (model version, dim, metric), checksums."""
    directory = Path(directory)
    m = read_manifest(directory, KIND, FORMAT_VERSION)
    where = directory / MANIFEST
    for key in ("backend", "dim", "metric", "model_version", "checksums", "build_params", "search_defaults"):
        if key not in m:
            raise ArtifactError(f"{where}: field {key!r} missing; the snapshot is incomplete, republish it")
    if expected_model_version is not None and m["model_version"] != expected_model_version:
        raise IndexIncompatible(
            f"{directory}: index built from item tower {m['model_version']!r}, but the user tower "
            f"is {expected_model_version!r}; rebuild the index from this model's item vectors"
        )
    if expected_dim is not None and int(m["dim"]) != int(expected_dim):
        raise IndexIncompatible(f"{directory}: index dim {m['dim']} does not match the model's dim {expected_dim}")
    if m["metric"] != "ip":
        raise IndexIncompatible(f"{where}: metric {m['metric']!r}; towerann serves inner-product ('ip') indexes")
    if verify:
        on_disk = _files(directory)
        listed = sorted(m["checksums"])
        if on_disk != listed:
            raise ArtifactError(
                f"{directory}: files {sorted(set(on_disk) ^ set(listed))} differ from the manifest's list; "
                "the snapshot was modified, republish it"
            )
        for name, digest in m["checksums"].items():
            if sha256_file(directory / name) != digest:
                raise ArtifactError(
                    f"{directory / name}: checksum mismatch (file corrupted or replaced); republish the index"
                )
    return m


def load_snapshot(
    directory: str | Path,
    expected_model_version: str | None = None,
    expected_dim: int | None = None,
    verify: bool = True,
) -> Index:
    """Load and check a snapshot (or a root's CURRENT snapshot); the manifest is kept on `index.manifest`."""
    from towerann.index import backend_class

    directory = resolve(directory)
    m = read_checked_manifest(directory, expected_model_version, expected_dim, verify)
    index = backend_class(m["backend"]).load(directory, m)
    index.manifest, index.version = m, directory.name
    if len(index) != m.get("count", len(index)):
        raise ArtifactError(f"{directory}: {len(index)} live items loaded, the manifest says {m['count']}")
    return index

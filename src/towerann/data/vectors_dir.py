"""The item-vector artifact: what `towerann embed` writes and `towerann index build` reads.

Layout of a vectors directory:
  manifest.json          kind "vectors": model version, dim, metric, count, parts, checksums
  vectors-00000.npy ...  float32 [n_part, dim], L2-normalised
  ids-00000.npy ...      int64 [n_part] internal ids (the item's row in the catalog)
  external_ids.npy       the catalog's item ids (int64 or unicode), indexed by internal id
  categories.npy         int32 category code per internal id; names in the manifest
  available.npy          bool per internal id
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import MANIFEST, atomic_dir, load_npy, read_manifest, save_npy, write_manifest
from towerann.errors import ArtifactError

KIND = "vectors"
FORMAT_VERSION = 1
# category code 0: items whose category the catalog does not give (never a filter users choose from)
UNKNOWN_CATEGORY = "<unknown>"


@dataclass
class VectorSet:
    vectors: np.ndarray  # f32 [n, dim]
    ids: np.ndarray  # i64 [n]
    categories: np.ndarray  # i32 [n]
    available: np.ndarray  # bool [n]
    category_names: list[str]
    external_ids: np.ndarray
    model_version: str
    dim: int
    metric: str

    def __len__(self) -> int:
        return len(self.ids)


def part_names(i: int) -> tuple[str, str]:
    return f"vectors-{i:05d}.npy", f"ids-{i:05d}.npy"


def write_part(directory: Path, i: int, vectors: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    """Write one part (temp name, then rename) and return its manifest entry."""
    vec_name, ids_name = part_names(i)
    entry: dict[str, Any] = {"vectors": vec_name, "ids": ids_name, "count": int(len(ids))}
    for name, arr, key in (
        (vec_name, vectors.astype(np.float32, copy=False), "sha256"),
        (ids_name, ids.astype(np.int64, copy=False), "ids_sha256"),
    ):
        tmp = directory / f".{name}.tmp.npy"
        entry[key] = save_npy(tmp, arr)
        tmp.replace(directory / name)
    return entry


def write_attrs(
    directory: Path, external_ids: np.ndarray, categories: np.ndarray, available: np.ndarray
) -> dict[str, str]:
    return {
        "external_ids": save_npy(directory / "external_ids.npy", external_ids),
        "categories": save_npy(directory / "categories.npy", categories.astype(np.int32, copy=False)),
        "available": save_npy(directory / "available.npy", available.astype(bool, copy=False)),
    }


def manifest_for(
    parts: list[dict],
    attrs: dict[str, str],
    *,
    model_version: str,
    dim: int,
    metric: str,
    category_names: Sequence[str],
    extra: dict | None = None,
) -> dict[str, Any]:
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "dim": int(dim),
        "metric": metric,
        "count": int(sum(p["count"] for p in parts)),
        "parts": parts,
        "attrs_sha256": attrs,
        "category_names": list(category_names),
        **(extra or {}),
    }


def write_vectors(
    out: str | Path,
    vectors: np.ndarray,
    ids: np.ndarray,
    categories: np.ndarray,
    available: np.ndarray,
    category_names: Sequence[str],
    model_version: str,
    external_ids: np.ndarray,
    metric: str = "ip",
    part_size: int = 1 << 20,
    overwrite: bool = False,
) -> Path:
    """Write an in-memory vector set as a vectors directory (atomically)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ArtifactError(f"vectors must be [n, dim] with one id per row; got {vectors.shape} and {len(ids)} ids")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        parts = [
            write_part(tmp, i, vectors[s : s + part_size], ids[s : s + part_size])
            for i, s in enumerate(range(0, max(len(ids), 1), part_size))
        ]
        attrs = write_attrs(tmp, external_ids, categories, available)
        manifest = manifest_for(
            parts,
            attrs,
            model_version=model_version,
            dim=vectors.shape[1],
            metric=metric,
            category_names=category_names,
        )
        write_manifest(tmp / MANIFEST, manifest)
    return Path(out)


def vectors_model_version(directory: str | Path) -> str:
    """The version of the model that embedded a vectors directory, from its manifest alone (cheap)."""
    return str(read_manifest(directory, KIND, FORMAT_VERSION)["model_version"])


def read_vectors(directory: str | Path, verify: bool = True) -> VectorSet:
    """Load a vectors directory, checking its manifest and (by default) every checksum."""
    directory = Path(directory)
    m = read_manifest(directory, KIND, FORMAT_VERSION)
    total = sum(int(p["count"]) for p in m["parts"])
    if total != m["count"]:
        raise ArtifactError(f"{directory}: {total} vectors in the parts, manifest says {m['count']}")
    # One array filled part by part from the mapped files: no second copy of the catalog (10M x 128-d
    # is 5 GB), as concatenating loaded parts would make.
    vectors = np.empty((total, int(m["dim"])), np.float32)
    ids = np.empty(total, np.int64)
    at = 0
    for p in m["parts"]:
        v = load_npy(directory / p["vectors"], p["sha256"] if verify else None, mmap=True)
        i = load_npy(directory / p["ids"], p["ids_sha256"] if verify else None, mmap=True)
        if v.ndim != 2 or v.shape[1] != m["dim"] or len(v) != p["count"] or len(i) != p["count"]:
            raise ArtifactError(
                f"{directory / p['vectors']}: shape {v.shape} does not match the manifest "
                f"(dim {m['dim']}, count {p['count']})"
            )
        vectors[at : at + len(v)] = v
        ids[at : at + len(v)] = i
        at += len(v)
        del v, i
    sums = m["attrs_sha256"]
    attrs = {k: load_npy(directory / f"{k}.npy", sums[k] if verify else None) for k in sums}
    return VectorSet(
        vectors=vectors,
        ids=ids,
        categories=attrs["categories"],
        available=attrs["available"],
        category_names=list(m["category_names"]),
        external_ids=attrs["external_ids"],
        model_version=m["model_version"],
        dim=int(m["dim"]),
        metric=m["metric"],
    )

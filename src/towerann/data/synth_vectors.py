"""A seeded synthetic *vector* catalog with far-off queries: the hard case for an ANN index.

Items: unit-norm vectors around cluster centres. Cluster sizes are Zipf-skewed (a few huge
clusters, a long tail of small ones) and both the centres and the within-cluster spread follow
a power-law covariance spectrum (eigenvalue i ~ i^-spectrum, in a random rotation), so most of
the variance lives in a few directions, as in learned embeddings.

Queries: the mean of a few random items (`mix`, usually from different clusters) plus isotropic
noise, normalised - they sit between clusters, far from every item, the way user-tower vectors
drift from the item vectors an index was built and tuned on. Item-vector queries score ~1 with
their nearest item; these score far lower, and their top-k is spread over many partitions.

Each part (world, items, queries) has its own RNG stream spawned from the seed and items are drawn
in fixed-size chunks, so the same seed gives byte-identical arrays on any machine with numpy's
default generator. Nothing here imports index/ or bench/ (layer 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from towerann.errors import ConfigError

CHUNK = 65536  # items drawn per step; fixed, since it shapes the RNG stream
FORMAT = "far-off-vectors/1"  # bump when a change to the generator changes its output


@dataclass
class VectorCatalog:
    vectors: np.ndarray  # f32 [n, dim], unit norm; item id = row number
    queries: np.ndarray  # f32 [m, dim], unit norm (inner product ranks the same as cosine)
    clusters: np.ndarray  # int32 [n]: each item's cluster
    params: dict[str, Any] = field(default_factory=dict)  # everything needed to regenerate it


def default_clusters(n_items: int) -> int:
    """About one cluster per 500 items, clamped to 16..4000."""
    return int(min(max(n_items // 500, 16), 4000))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def far_off_catalog(
    n_items: int,
    n_queries: int,
    dim: int = 128,
    *,
    seed: int = 0,
    n_clusters: int | None = None,
    zipf: float = 1.1,
    spectrum: float = 0.5,
    spread: float = 1.0,
    mix: tuple[int, int] = (3, 8),
    noise: float = 1.0,
) -> VectorCatalog:
    """Items in Zipf-sized clusters under a power-law spectrum; queries = mean of `mix` items + noise.

    `spread`: within-cluster std relative to the spread of the centres; `noise`: the std of the
    query noise relative to the norm of the mixed items' mean (0 and mix=(1, 1) give item queries).
    """
    if n_items < 2 or n_queries < 1 or dim < 2:
        raise ConfigError(
            f"need >= 2 items, >= 1 query and dim >= 2; got items={n_items}, queries={n_queries}, dim={dim}"
        )
    lo, hi = (int(mix[0]), int(mix[1])) if len(mix) == 2 else (0, 0)
    if not 1 <= lo <= hi:
        raise ConfigError(f"mix must be (min, max) items per query with 1 <= min <= max, got {tuple(mix)}")
    if zipf < 0 or spectrum < 0 or spread <= 0 or noise < 0:
        raise ConfigError(
            f"zipf, spectrum and noise must be >= 0 and spread > 0; got zipf={zipf}, "
            f"spectrum={spectrum}, spread={spread}, noise={noise}"
        )
    c = min(default_clusters(n_items) if n_clusters is None else int(n_clusters), n_items)
    if c < 1:
        raise ConfigError(f"n_clusters must be >= 1, got {n_clusters}")
    world_rng, item_rng, query_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    # The world: a random rotation, the power-law axis scales, cluster centres and Zipf sizes.
    rot, _ = np.linalg.qr(world_rng.standard_normal((dim, dim)))
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-spectrum / 2)  # std per axis: sqrt(eigenvalue)
    basis = (scale[:, None] * rot.T).astype(np.float32)  # z @ basis: z ~ N(0, I) -> N(0, R diag(s^2) R^T)
    centres = world_rng.standard_normal((c, dim), dtype=np.float32) @ basis
    weights = np.arange(1, c + 1, dtype=np.float64) ** -zipf
    sizes = world_rng.multinomial(n_items, weights / weights.sum())
    clusters = np.repeat(np.arange(c, dtype=np.int32), sizes)
    clusters = clusters[world_rng.permutation(n_items)]  # ids carry no cluster order

    vectors = np.empty((n_items, dim), np.float32)
    for s in range(0, n_items, CHUNK):
        e = min(s + CHUNK, n_items)
        z = item_rng.standard_normal((e - s, dim), dtype=np.float32)
        vectors[s:e] = _unit(centres[clusters[s:e]] + np.float32(spread) * (z @ basis))

    counts = query_rng.integers(lo, hi + 1, n_queries)
    picks = query_rng.integers(0, n_items, (n_queries, hi))
    use = np.arange(hi)[None, :] < counts[:, None]
    mean = (vectors[picks] * use[:, :, None]).sum(axis=1) / counts[:, None].astype(np.float32)
    size = np.linalg.norm(mean, axis=1, keepdims=True) / np.sqrt(np.float32(dim))  # noise per axis
    queries = _unit(mean + np.float32(noise) * size * query_rng.standard_normal((n_queries, dim), dtype=np.float32))

    params = {
        "generator": FORMAT,
        "items": n_items,
        "queries": n_queries,
        "dim": dim,
        "seed": seed,
        "n_clusters": c,
        "zipf": zipf,
        "spectrum": spectrum,
        "spread": spread,
        "mix": [lo, hi],
        "noise": noise,
        "largest_cluster_share": round(float(sizes.max()) / n_items, 4),
    }
    return VectorCatalog(vectors, queries.astype(np.float32, copy=False), clusters, params)

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


def _world(
    rng: np.random.Generator, n_items: int, dim: int, c: int, zipf: float, spectrum: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(basis, centres, cluster sizes, each item's cluster): a random rotation, the power-law axis scales,
    cluster centres and Zipf sizes, drawn from `rng` in this order."""
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-spectrum / 2)  # std per axis: sqrt(eigenvalue)
    basis = (scale[:, None] * rot.T).astype(np.float32)  # z @ basis: z ~ N(0, I) -> N(0, R diag(s^2) R^T)
    centres = rng.standard_normal((c, dim), dtype=np.float32) @ basis
    weights = np.arange(1, c + 1, dtype=np.float64) ** -zipf
    sizes = rng.multinomial(n_items, weights / weights.sum())
    clusters = np.repeat(np.arange(c, dtype=np.int32), sizes)
    return basis, centres, sizes, clusters[rng.permutation(n_items)]  # ids carry no cluster order


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

    basis, centres, sizes, clusters = _world(world_rng, n_items, dim, c, zipf, spectrum)

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


PARTS_FORMAT = "far-off-parts/1"  # FarOffParts' output; bump when a change to it changes its output
PART_STREAM = 0x70617274  # mixed into each part's seed: its stream is none of far_off_catalog's
QUERY_STYLES = ("far", "cluster")
CLUSTER_MIX = (2, 4)  # "cluster" queries: items of one cluster averaged (bench drift's tuning distribution)
CLUSTER_NOISE = 0.5  # and their noise, relative to the mean's size (far-off queries: 1.0)


class FarOffParts:
    """far_off_catalog's world made a part at a time, for catalogs too big to hold or to store whole
    (100M x 128-d float32 is 51 GB): part i (items [i * part_size, ...)) is drawn from its own RNG stream,
    so it is the same whatever other parts were made, in any order, as often as asked. Item ids are
    row numbers, an item's category is its cluster, every item is available. It has the shape of
    index.ivfpq_resumable.PartSource (a resumable ivfpq build reads it part by part, no vectors file).
    The arrays differ from far_off_catalog's for the same seed (other streams); the world's shape is
    the same."""

    def __init__(
        self,
        n_items: int,
        part_size: int,
        dim: int = 128,
        *,
        seed: int = 0,
        n_clusters: int | None = None,
        zipf: float = 1.1,
        spectrum: float = 0.5,
        spread: float = 1.0,
        mix: tuple[int, int] = (3, 8),
        noise: float = 1.0,
    ):
        if n_items < 2 or part_size < 1 or dim < 2:
            raise ConfigError(f"need >= 2 items, part_size >= 1 and dim >= 2; got {n_items}, {part_size}, {dim}")
        self.n, self.part_size, self.dim, self.metric, self.seed = n_items, part_size, dim, "ip", seed
        self.spread, self.mix, self.noise = spread, (int(mix[0]), int(mix[1])), noise
        c = min(default_clusters(n_items) if n_clusters is None else int(n_clusters), n_items)
        world_rng = np.random.default_rng([seed, PART_STREAM])
        self.basis, self.centres, _, self.clusters = _world(world_rng, n_items, dim, c, zipf, spectrum)
        self.params = {
            "generator": PARTS_FORMAT,
            "items": n_items,
            "part_size": part_size,
            "dim": dim,
            "seed": seed,
            "n_clusters": c,
            "zipf": zipf,
            "spectrum": spectrum,
            "spread": spread,
            "mix": list(self.mix),
            "noise": noise,
        }

    def part_counts(self) -> list[int]:
        return [min(self.part_size, self.n - s) for s in range(0, self.n, self.part_size)]

    def part(self, i: int, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Part i's (unit float32 vectors, int64 ids); `verify` is a PartSource's (nothing stored to check)."""
        start = i * self.part_size
        stop = min(start + self.part_size, self.n)
        rng = np.random.default_rng([self.seed, PART_STREAM, i + 1])
        vectors = np.empty((stop - start, self.dim), np.float32)
        for s in range(start, stop, CHUNK):
            e = min(s + CHUNK, stop)
            z = rng.standard_normal((e - s, self.dim), dtype=np.float32)
            spread = np.float32(self.spread) * (z @ self.basis)
            vectors[s - start : e - start] = _unit(self.centres[self.clusters[s:e]] + spread)
        return vectors, np.arange(start, stop, dtype=np.int64)

    def attributes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.clusters[ids], np.ones(len(ids), bool)

    @property
    def category_names(self) -> list[str]:
        """Names of the category codes `attributes` gives: one per cluster."""
        return [f"cluster-{c}" for c in range(len(self.centres))]

    def external_ids(self) -> np.ndarray:
        """Every item's id: its row number."""
        return np.arange(self.n, dtype=np.int64)

    def fingerprint(self) -> dict[str, Any]:
        return dict(self.params)

    def queries(self, n_queries: int, seed: int = 0, style: str = "far") -> np.ndarray:
        """Queries, each part made at most once. style "far": the mean of `mix` random items plus noise of
        the mean's size (between clusters, the hard case); "cluster": the mean of 2-4 items of one cluster
        (drawn in proportion to its size) plus half that noise - near a cluster but on no item, as a
        user-tower query sits near the items it came from."""
        if style not in QUERY_STYLES:
            raise ConfigError(f"query style {style!r}: expected one of {', '.join(QUERY_STYLES)}")
        rng = np.random.default_rng([self.seed, PART_STREAM, 0, seed])
        if style == "far":
            lo, hi = self.mix
            noise = self.noise
            picks = rng.integers(0, self.n, (n_queries, hi))
        else:
            (lo, hi), noise = CLUSTER_MIX, CLUSTER_NOISE
            by_cluster = np.argsort(self.clusters, kind="stable")
            starts = np.searchsorted(self.clusters[by_cluster], np.arange(len(self.centres) + 1))
            home = self.clusters[rng.integers(0, self.n, n_queries)]  # a cluster in proportion to its size
            size = starts[home + 1] - starts[home]
            picks = by_cluster[starts[home][:, None] + (rng.random((n_queries, hi)) * size[:, None]).astype(np.int64)]
            del by_cluster
        counts = rng.integers(lo, hi + 1, n_queries)
        picked = np.empty((*picks.shape, self.dim), np.float32)
        for i in np.unique(picks // self.part_size).tolist():
            here = picks // self.part_size == i
            vectors, _ = self.part(i)
            picked[here] = vectors[picks[here] - i * self.part_size]
        use = np.arange(hi)[None, :] < counts[:, None]
        mean = (picked * use[:, :, None]).sum(axis=1) / counts[:, None].astype(np.float32)
        size_ = np.linalg.norm(mean, axis=1, keepdims=True) / np.sqrt(np.float32(self.dim))
        noisy = mean + np.float32(noise) * size_ * rng.standard_normal((n_queries, self.dim), dtype=np.float32)
        return _unit(noisy).astype(np.float32, copy=False)

"""A seeded synthetic dataset with the structure a two-tower model can learn.

The hidden world: each category has a centre in R^16 and each item a latent = centre + noise.
Categories differ in size and appeal (Zipf-like), items within a category in popularity (Pareto,
so the rank-frequency curve is Zipf-like, scaled by `quality`). A user mixes 1..3 interest
categories (chosen by appeal) with Dirichlet weights and has a taste direction in latent space
that depends partly on `country` and `age`. Each interaction picks a category from the mix (often
staying in the previous one, like a session), draws a few candidates there by popularity and keeps
one with probability ~ exp(beta * taste . latent): popularity x affinity, by
sampling-importance-resampling. Timestamps grow per user over a 60-day window in bursts.

Observable features leak the world as real catalogs do: `price` follows the first latent axis,
`brand` mostly belongs to one category, `quality` drives popularity.

Everything streams: items, users and interactions are written in fixed-size chunks with
`ParquetWriter`, and only compact per-item arrays (category, popularity, float16 noise) stay in
memory for sampling - about 60 bytes per item. Each part (world, items, users, interactions) has
its own RNG stream spawned from the seed, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from towerann.artifacts import atomic_dir
from towerann.data.dataset import INTERACTIONS, ITEMS, USERS, validate_dataset, write_manifest
from towerann.errors import ConfigError

log = logging.getLogger(__name__)

LATENT_DIM = 16
ITEM_CHUNK = 65536  # rows per item row group; also the RNG chunking, so fixed for determinism
USER_CHUNK = 4096  # users per chunk (the Gumbel top-k over categories is users x categories)
SAMPLE_CHUNK = 65536  # interactions per candidate-sampling step (bounds the candidate tensor)
N_CANDIDATES = 16  # popularity-drawn candidates per interaction, resampled by affinity
BETA = 2.5  # affinity sharpness
NOISE_STD = 0.6
STICKY = 0.5  # probability that the next interaction stays in the previous category
GLOBAL_BRANDS = 50
START_TS = 1_700_000_000  # 2023-11-14, fixed so output does not depend on the clock
WINDOW_S = 60 * 86400
COUNTRIES = [
    "US",
    "IN",
    "BR",
    "GB",
    "DE",
    "FR",
    "JP",
    "MX",
    "ID",
    "CA",
    "IT",
    "ES",
    "KR",
    "TR",
    "PL",
    "NL",
    "AU",
    "SE",
    "NG",
    "ZA",
]

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("category", pa.string()),
        ("available", pa.bool_()),
        ("price", pa.float32()),
        ("quality", pa.float32()),
        ("brand", pa.string()),
    ]
)
USER_SCHEMA = pa.schema([("user_id", pa.int64()), ("age", pa.float32()), ("country", pa.string())])
INTERACTION_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])


def default_categories(n_items: int) -> int:
    return int(min(max(n_items // 500, 8), 1000))


def _check_range(name: str, r: tuple[int, int], low: int) -> tuple[int, int]:
    if len(r) != 2 or int(r[0]) < low or int(r[1]) < int(r[0]):
        raise ConfigError(f"{name} must be (min, max) with {low} <= min <= max, got {r}")
    return int(r[0]), int(r[1])


class _World:
    """The hidden structure, drawn from its own stream so it does not depend on chunking."""

    def __init__(self, rng: np.random.Generator, n_categories: int):
        c = n_categories
        self.centres = rng.normal(0.0, 1.0, (c, LATENT_DIM)).astype(np.float32)
        rank = rng.permutation(c) + 1.0
        self.size_w = rank**-0.6  # how many items a category holds
        self.size_w /= self.size_w.sum()
        self.appeal = rng.permutation(c) + 1.0  # how many users a category interests (independent of size)
        self.appeal = self.appeal**-1.0
        self.n_brands = rng.integers(3, 31, c)
        self.country_dir = rng.normal(0.0, 1.0, (len(COUNTRIES), LATENT_DIM)).astype(np.float32)
        self.country_p = np.arange(1, len(COUNTRIES) + 1) ** -1.0
        self.country_p /= self.country_p.sum()
        self.age_dir = rng.normal(0.0, 1.0, LATENT_DIM).astype(np.float32)
        self.category_names = pa.array([f"cat_{i:04d}" for i in range(c)])
        self.brand_offset = np.r_[0, np.cumsum(self.n_brands)]
        self.brand_names = pa.array(
            [f"b{i:04d}_{j:02d}" for i in range(c) for j in range(self.n_brands[i])]
            + [f"global_{j:02d}" for j in range(GLOBAL_BRANDS)]
        )


def _write_items(
    path: Path, world: _World, rng: np.random.Generator, n_items: int, popularity_skew: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream items.parquet; return the compact arrays sampling needs (category, popularity, noise)."""
    n_cat = len(world.centres)
    cat_all = np.empty(n_items, np.int32)
    pop_all = np.empty(n_items, np.float32)
    noise_all = np.empty((n_items, LATENT_DIM), np.float16)
    with (
        pq.ParquetWriter(path, ITEM_SCHEMA) as writer,
        tqdm(total=n_items, desc="items", unit="item", disable=None) as bar,
    ):
        for lo in range(0, n_items, ITEM_CHUNK):
            hi = min(lo + ITEM_CHUNK, n_items)
            n = hi - lo
            cat = rng.choice(n_cat, size=n, p=world.size_w).astype(np.int32)
            first = np.arange(lo, min(hi, n_cat))  # item i < n_categories is in category i: none is empty
            cat[first - lo] = first
            noise = rng.normal(0.0, NOISE_STD, (n, LATENT_DIM)).astype(np.float32)
            latent = world.centres[cat] + noise
            price = np.round(np.exp(3.0 + 0.6 * latent[:, 0] + 0.2 * rng.normal(size=n)), 2).astype(np.float32)
            quality = rng.beta(4.0, 2.0, n).astype(np.float32)
            pop = ((rng.pareto(1.5, n) + 1.0) * (0.25 + quality)).astype(np.float32)
            if popularity_skew != 1.0:  # a power of the weights: > 1 concentrates clicks on the head, < 1 flattens
                pop = (pop.astype(np.float64) ** popularity_skew).astype(np.float32)
            # brand: mostly one of the category's own (skewed to the first), sometimes a global one
            local = (world.n_brands[cat] * rng.random(n) ** 2).astype(np.int64)
            brand = np.where(
                rng.random(n) < 0.1,
                world.brand_offset[-1] + rng.integers(0, GLOBAL_BRANDS, n),
                world.brand_offset[cat] + local,
            )
            available = rng.random(n) < 0.97
            table = pa.Table.from_arrays(
                [
                    pa.array(np.arange(lo, hi, dtype=np.int64)),
                    world.category_names.take(pa.array(cat)),
                    pa.array(available),
                    pa.array(price),
                    pa.array(quality),
                    world.brand_names.take(pa.array(brand)),
                ],
                schema=ITEM_SCHEMA,
            )
            writer.write_table(table)
            cat_all[lo:hi], pop_all[lo:hi], noise_all[lo:hi] = cat, pop, noise
            bar.update(n)
    return cat_all, pop_all, noise_all


class _Sampler:
    """Draw items within a category by popularity x affinity."""

    def __init__(self, cat: np.ndarray, pop: np.ndarray, noise: np.ndarray, n_categories: int):
        self.order = np.argsort(cat, kind="stable")  # item ids grouped by category
        self.cdf = np.cumsum(pop[self.order], dtype=np.float64)
        counts = np.bincount(cat, minlength=n_categories)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        self.count = counts
        self.noise = noise

    def draw(self, rng: np.random.Generator, cats: np.ndarray, taste: np.ndarray) -> np.ndarray:
        """One item per row: `cats[t]` is the category, `taste[t]` the user's direction."""
        lo, hi = self.start[cats], self.end[cats]
        base = np.where(lo > 0, self.cdf[np.maximum(lo - 1, 0)], 0.0)
        span = self.cdf[hi - 1] - base
        target = base[:, None] + rng.random((len(cats), N_CANDIDATES)) * span[:, None]
        pos = np.searchsorted(self.cdf, target, side="right")
        pos = np.clip(pos, lo[:, None], hi[:, None] - 1)
        cand = self.order[pos]  # [t, m] item ids
        logits = BETA * np.einsum("tmd,td->tm", self.noise[cand].astype(np.float32), taste)
        pick = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        return cand[np.arange(len(cats)), pick]


def _users_chunk(
    world: _World, rng: np.random.Generator, n: int, allowed: np.ndarray, cpu: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Static features and hidden interests of n users: age, country, interest cats [n,k], weights [n,k], taste."""
    age = np.clip(rng.normal(38.0, 13.0, n), 16.0, 85.0).round().astype(np.float32)
    country = rng.choice(len(COUNTRIES), size=n, p=world.country_p)
    k_max = cpu[1]
    k = rng.integers(cpu[0], cpu[1] + 1, n)
    # weighted sampling without replacement (Gumbel top-k) over categories that hold items
    keys = np.where(allowed, np.log(world.appeal), -np.inf)[None, :] + rng.gumbel(size=(n, len(allowed)))
    top = np.argpartition(-keys, k_max - 1, axis=1)[:, :k_max]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)
    w = rng.gamma(1.0, 1.0, (n, k_max)) + 1e-6
    w[np.arange(k_max)[None, :] >= k[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    age_z = ((age - 38.0) / 13.0)[:, None]
    taste = 0.6 * world.country_dir[country] + 0.5 * age_z * world.age_dir + rng.normal(0.0, 0.6, (n, LATENT_DIM))
    taste /= np.linalg.norm(taste, axis=1, keepdims=True)
    return age, country, top, w, taste.astype(np.float32)


def _interactions_chunk(
    rng: np.random.Generator,
    sampler: _Sampler,
    user0: int,
    top: np.ndarray,
    w: np.ndarray,
    taste: np.ndarray,
    ipu: tuple[int, int],
) -> pa.Table:
    n = len(top)
    counts = np.floor(np.exp(rng.uniform(np.log(ipu[0]), np.log(ipu[1] + 1), n))).astype(np.int64)
    counts = np.clip(counts, ipu[0], ipu[1])
    total = int(counts.sum())
    user = np.repeat(np.arange(n), counts)
    first = np.zeros(total, bool)
    first[np.r_[0, np.cumsum(counts)[:-1]]] = True
    # category slot: a fresh draw from the user's mix, or (sticky) the previous interaction's
    fresh = first | (rng.random(total) >= STICKY)
    slot = (np.cumsum(w, axis=1)[user] < rng.random(total)[:, None]).sum(axis=1)
    slot = np.minimum(slot, (w > 0).sum(axis=1)[user] - 1)
    src = np.maximum.accumulate(np.where(fresh, np.arange(total), 0))
    cats = top[user, slot[src]]
    items = np.empty(total, np.int64)
    for lo in range(0, total, SAMPLE_CHUNK):
        hi = min(lo + SAMPLE_CHUNK, total)
        items[lo:hi] = sampler.draw(rng, cats[lo:hi], taste[user[lo:hi]])
    # timestamps: a start in the window, then bursty gaps (sessions), squeezed to fit, strictly increasing
    start = rng.uniform(0.0, 0.8 * WINDOW_S, n)
    gaps = np.where(rng.random(total) < 0.7, rng.exponential(90.0, total), rng.exponential(86400.0, total))
    gaps[first] = 0.0
    pos_end = np.cumsum(counts)
    cum = np.cumsum(gaps)
    cum -= np.repeat(cum[pos_end - counts], counts)  # per-user cumulative
    span = np.maximum(cum[pos_end - 1], 1.0)
    room = WINDOW_S - start
    scale = np.minimum(1.0, room / span)
    ts = START_TS + np.floor(start[user] + cum * scale[user]).astype(np.int64)
    rank = np.arange(total) - np.repeat(pos_end - counts, counts)
    off = user.astype(np.int64) << 33  # keep users apart in the running max
    ts = np.maximum.accumulate(ts - rank + off) - off + rank
    return pa.Table.from_arrays(
        [pa.array(user + user0, pa.int64()), pa.array(items), pa.array(ts)], schema=INTERACTION_SCHEMA
    )


def generate(
    out: str | Path,
    n_items: int,
    n_users: int,
    seed: int = 0,
    n_categories: int | None = None,
    interactions_per_user: tuple[int, int] = (5, 60),
    categories_per_user: tuple[int, int] = (1, 3),
    overwrite: bool = False,
    popularity_skew: float = 1.0,
) -> Path:
    """Write a synthetic dataset to `out` (atomically) and return its path.

    popularity_skew: exponent on the items' popularity weights; 1 is the default world, > 1 a steeper
    head (a long, thin tail), < 1 a flatter curve (clicks spread over more items)."""
    if n_items < 1 or n_users < 1:
        raise ConfigError(f"need at least 1 item and 1 user, got items={n_items} users={n_users}")
    n_cat = default_categories(n_items) if n_categories is None else int(n_categories)
    if not 1 <= n_cat <= n_items:
        raise ConfigError(f"categories must be between 1 and the number of items ({n_items}), got {n_cat}")
    if not 0.0 <= popularity_skew <= 4.0:
        raise ConfigError(f"popularity_skew must be between 0 and 4, got {popularity_skew}")
    ipu = _check_range("interactions_per_user", interactions_per_user, 1)
    cpu = _check_range("categories_per_user", categories_per_user, 1)
    if cpu[1] > n_cat:
        raise ConfigError(f"categories_per_user max {cpu[1]} exceeds the number of categories ({n_cat})")
    t0 = time.perf_counter()
    ss_world, ss_items, ss_users, ss_inter = np.random.SeedSequence(seed).spawn(4)
    world = _World(np.random.default_rng(ss_world), n_cat)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        cat, pop, noise = _write_items(tmp / ITEMS, world, np.random.default_rng(ss_items), n_items, popularity_skew)
        sampler = _Sampler(cat, pop, noise, n_cat)
        del cat, pop
        allowed = sampler.count > 0
        rng_u, rng_i = np.random.default_rng(ss_users), np.random.default_rng(ss_inter)
        n_inter = 0
        with (
            pq.ParquetWriter(tmp / USERS, USER_SCHEMA) as uw,
            pq.ParquetWriter(tmp / INTERACTIONS, INTERACTION_SCHEMA) as iw,
            tqdm(total=n_users, desc="users", unit="user", disable=None) as bar,
        ):
            country_names = pa.array(COUNTRIES)
            for lo in range(0, n_users, USER_CHUNK):
                n = min(USER_CHUNK, n_users - lo)
                age, country, top, w, taste = _users_chunk(world, rng_u, n, allowed, cpu)
                uw.write_table(
                    pa.Table.from_arrays(
                        [
                            pa.array(np.arange(lo, lo + n, dtype=np.int64)),
                            pa.array(age),
                            country_names.take(pa.array(country)),
                        ],
                        schema=USER_SCHEMA,
                    )
                )
                table = _interactions_chunk(rng_i, sampler, lo, top, w, taste, ipu)
                iw.write_table(table)
                n_inter += table.num_rows
                bar.update(n)
        params = {
            "n_items": n_items,
            "n_users": n_users,
            "n_categories": n_cat,
            "interactions_per_user": list(ipu),
            "categories_per_user": list(cpu),
        }
        if popularity_skew != 1.0:  # only when set, so default manifests (and their bytes) stay as they were
            params["popularity_skew"] = popularity_skew
        write_manifest(tmp, "synthetic", {"seed": seed, "params": params})
        validate_dataset(tmp)
    log.info(
        "synthetic dataset %s: %d items, %d users, %d interactions in %.1fs",
        out,
        n_items,
        n_users,
        n_inter,
        time.perf_counter() - t0,
    )
    return out

"""Offline evaluation: recall@K and NDCG@10 on held-out interactions by exact retrieval.

For each user with held-out interactions, the query is the user tower's vector at the moment the
held-out period starts (history = the items before it), the candidates are the whole catalog minus
what the user already interacted with, and the targets are the held-out items. The two-tower model
is measured beside a popularity baseline and implicit's ALS on the same split (ALS's settings chosen on
the validation split by `tune_als`, when asked).

The same held-out users' vectors are the queries an index is tuned on: `write_heldout_queries` writes
them for `towerann index build --queries` (`towerann model queries`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from towerann.artifacts import save_npy_atomic
from towerann.errors import BackendUnavailable, ConfigError, DataError
from towerann.model.model import TwoTowerModel
from towerann.model.prepare import TEST, TRAIN, VALID, Prepared, prepare

log = logging.getLogger(__name__)

KS = (10, 100, 1000)
MIN_GAIN = 1e-4  # a setting must beat the best validation recall by this much to be kept (ALS grid, model search)

# ALS grid (factors x regularisation x confidence alpha), scored like the model search: fit on TRAIN, recall on VALID.
ALS_GRID: dict[str, tuple[float, ...]] = {
    "factors": (32, 64, 128),
    "regularization": (0.01, 0.1, 1.0),
    "alpha": (1.0, 10.0),
}


class AlsParams(TypedDict):
    """One point of the ALS grid: als_topk's keyword arguments."""

    factors: int
    regularization: float
    alpha: float


@dataclass
class Queries:
    """Held-out users of one split: where their queries come from and what they should find."""

    rows: np.ndarray  # interaction row of each user's first held-out interaction
    targets: list[np.ndarray]  # catalog rows held out, per user
    seen: list[np.ndarray]  # catalog rows interacted with before, per user


def held_out(p: Prepared, split: int) -> Queries:
    rows, targets, seen = [], [], []
    order = np.flatnonzero(p.split == split)
    if len(order) == 0:
        return Queries(np.zeros(0, np.int64), [], [])
    user_of = p.user_key
    starts = np.r_[0, np.flatnonzero(user_of[order][1:] != user_of[order][:-1]) + 1]
    ends = np.r_[starts[1:], len(order)]
    # rows of one user are contiguous in `p`, so "before" is simply the rows preceding the first held-out one
    user_start = {}
    keys = p.user_key
    first = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    for f in first:
        user_start[keys[f]] = f
    for s, e in zip(starts, ends):
        r0 = order[s]
        rows.append(r0)
        targets.append(np.unique(p.item_row[order[s:e]]))
        seen.append(np.unique(p.item_row[user_start[keys[r0]] : r0]))
    return Queries(np.asarray(rows, np.int64), targets, seen)


def user_queries(
    model: TwoTowerModel, p: Prepared, rows: np.ndarray, catalog_vocab: np.ndarray, catalog_cat: np.ndarray
) -> np.ndarray:
    """User-tower vectors at the given interaction rows (history = the items before each).

    catalog_vocab / catalog_cat: item-vocab index (0 = unknown) and category code per catalog row."""
    user_rows = p.user_row[rows]
    num, cat = model.schema.encode_user_frame(p.users)
    known = user_rows >= 0
    static_num = np.where(known[:, None], num[np.maximum(user_rows, 0)], 0).astype(np.float32)
    static_cat = np.where(known[:, None], cat[np.maximum(user_rows, 0)], 0)
    hist = p.hist_rows[rows]
    filled = hist >= 0
    hist_idx = np.where(filled, catalog_vocab[np.maximum(hist, 0)], 0)
    hist_cat = np.where(filled, catalog_cat[np.maximum(hist, 0)], 0)
    return model.encode_users(p.user_key[rows], static_num, static_cat, hist_idx, hist_cat, filled)


def heldout_user_queries(model: TwoTowerModel, data: str | Path, max_queries: int = 2000, seed: int = 0) -> np.ndarray:
    """User-tower vectors of held-out (test) requests: the queries an index is tuned and checked on.

    They are what serving sends; item vectors as queries overestimate an ANN index's recall."""
    p = prepare(data, model.cfg.history_len)
    rows = held_out(p, TEST).rows
    if len(rows) > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
    catalog_vocab = model.item_vocab.encode(p.items["item_id"].to_numpy())
    catalog_cat = model.schema.categories.encode(p.items["category"].to_numpy())
    return user_queries(model, p, rows, catalog_vocab, catalog_cat).astype(np.float32)


def write_heldout_queries(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    max_queries: int = 2000,
    seed: int = 0,
    vectors_model_version: str | None = None,
) -> np.ndarray:
    """Write the user-tower queries of `data`'s held-out users (heldout_user_queries) to the .npy file `out`,
    atomically, and return them: the tuning queries `towerann index build --queries` and `index tune --queries`
    read. `vectors_model_version`: refuse a model other than the one that embedded the vectors to be tuned."""
    if max_queries < 1:
        raise ConfigError(f"the number of queries must be >= 1, got {max_queries}")
    model = TwoTowerModel.load(model_dir)
    if vectors_model_version is not None and model.version != vectors_model_version:
        raise ConfigError(
            f"{model_dir} is {model.version!r} but the vectors come from {vectors_model_version!r}; "
            "make the queries with the model that embedded them"
        )
    queries = heldout_user_queries(model, data, max_queries, seed)
    if len(queries) == 0:
        raise DataError(f"{data}: no held-out (test) interactions, so no users to make queries of")
    save_npy_atomic(out, queries)
    return queries


def rank_scores(scores: torch.Tensor, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Top-k catalog rows per user after masking what each user has already seen."""
    for i, s in enumerate(seen):
        if len(s):
            scores[i, torch.from_numpy(s)] = -torch.inf
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy()


def metrics(top: np.ndarray, targets: list[np.ndarray], ks: tuple[int, ...] = KS) -> dict[str, float]:
    out: dict[str, float] = {}
    if not targets:
        return {f"recall@{k}": 0.0 for k in ks} | {"ndcg@10": 0.0, "users": 0}
    hits = [np.isin(top[i], t) for i, t in enumerate(targets)]
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([h[:k].sum() / len(t) for h, t in zip(hits, targets)]))
    disc = 1.0 / np.log2(np.arange(2, 12))
    ndcg = [(h[:10] * disc[: len(h[:10])]).sum() / disc[: min(len(t), 10)].sum() for h, t in zip(hits, targets)]
    out["ndcg@10"] = float(np.mean(ndcg))
    out["users"] = len(targets)
    return out


SCORES_PER_BATCH = 1 << 26  # users x items scored at once: 256 MB of float32 (1024 users at 65k items)


def subsample(q: Queries, n: int, seed: int = 0) -> Queries:
    """At most `n` of the held-out users (a seeded sample, in order): validation over a huge catalog."""
    if len(q.rows) <= n:
        return q
    keep = np.sort(np.random.default_rng(seed).choice(len(q.rows), n, replace=False))
    return Queries(q.rows[keep], [q.targets[i] for i in keep], [q.seen[i] for i in keep])


def two_tower_topk(
    model: TwoTowerModel, p: Prepared, q: Queries, k: int, item_vectors: np.ndarray | None = None, batch: int = 1024
) -> np.ndarray:
    catalog_vocab = model.item_vocab.encode(p.items["item_id"].to_numpy())
    catalog_cat = model.schema.categories.encode(p.items["category"].to_numpy())
    if item_vectors is None:
        item_vectors = model.encode_items(p.items)
    items_t = torch.from_numpy(item_vectors)
    batch = max(1, min(batch, SCORES_PER_BATCH // max(len(item_vectors), 1)))  # 10M items: 6 users a batch, not 40 GB
    out = []
    for s in range(0, len(q.rows), batch):
        Q = user_queries(model, p, q.rows[s : s + batch], catalog_vocab, catalog_cat)
        out.append(rank_scores(torch.from_numpy(Q) @ items_t.T, q.seen[s : s + batch], k))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def popularity_topk(p: Prepared, q: Queries, k: int) -> np.ndarray:
    before = p.split < TEST
    counts = np.bincount(p.item_row[before], minlength=len(p.items)).astype(np.float32)
    scores = torch.from_numpy(np.tile(counts, (len(q.rows), 1)))
    return rank_scores(scores, q.seen, k)


def als_topk(
    p: Prepared,
    q: Queries,
    k: int,
    factors: int = 64,
    iterations: int = 15,
    seed: int = 0,
    regularization: float = 0.01,
    alpha: float = 1.0,
    train_splits: tuple[int, ...] = (TRAIN, VALID),
) -> np.ndarray:
    """implicit's ALS on the interactions of `train_splits` (default: everything before the test period)."""
    import scipy.sparse as sp

    try:
        from implicit.als import AlternatingLeastSquares
    except ImportError as e:
        raise BackendUnavailable(f"the ALS baseline needs implicit: pip install 'towerann[eval]' ({e})") from e

    before = np.isin(p.split, train_splits)
    users, uidx = np.unique(p.user_key[before], return_inverse=True)
    mat = sp.csr_matrix(
        (np.ones(before.sum(), np.float32), (uidx, p.item_row[before])), shape=(len(users), len(p.items))
    )
    mat.data[:] = 1.0  # duplicates summed by csr -> binarise
    from threadpoolctl import threadpool_limits

    # implicit parallelises itself and warns about a threaded BLAS underneath: limit BLAS to one thread
    with threadpool_limits(1, "blas"):
        als = AlternatingLeastSquares(
            factors=factors,
            iterations=iterations,
            regularization=regularization,
            alpha=alpha,
            random_state=seed,
            calculate_training_loss=False,
        )
        als.fit(mat, show_progress=False)
    user_pos = np.searchsorted(users, p.user_key[q.rows])
    found = (user_pos < len(users)) & (users[np.minimum(user_pos, len(users) - 1)] == p.user_key[q.rows])
    U = np.asarray(als.user_factors)
    V = np.asarray(als.item_factors)
    scores = torch.from_numpy(np.where(found[:, None], U[np.minimum(user_pos, len(users) - 1)], 0.0) @ V.T)
    return rank_scores(scores.float(), q.seen, k)


def tune_als(
    p: Prepared, k: int = 100, seed: int = 0, grid: dict[str, tuple[float, ...]] | None = None
) -> tuple[AlsParams, list[dict[str, Any]]]:
    """The ALS grid point with the best validation recall@k (fit on TRAIN only); (chosen, every point)."""
    grid = grid or ALS_GRID
    q = held_out(p, VALID)
    trials: list[dict[str, Any]] = []
    best: AlsParams | None = None
    best_score = -1.0
    for factors in grid["factors"]:
        for reg in grid["regularization"]:
            for alpha in grid["alpha"]:
                params = AlsParams(factors=int(factors), regularization=float(reg), alpha=float(alpha))
                top = als_topk(p, q, k, seed=seed, train_splits=(TRAIN,), **params)
                score = metrics(top, q.targets, (k,))[f"recall@{k}"]
                trials.append({**params, f"val_recall@{k}": round(score, 6)})
                if score > best_score + MIN_GAIN:
                    best, best_score = params, score
    assert best is not None
    return best, trials


def _tuned_als_metrics(p: Prepared, q: Queries, k: int, ks: tuple[int, ...]) -> dict[str, Any]:
    """Test-split metrics of ALS at the grid point chosen on the validation split, with the grid."""
    chosen, grid = tune_als(p, seed=0)
    return metrics(als_topk(p, q, k, **chosen), q.targets, ks) | {"params": chosen, "grid": grid}


def evaluate(
    data: str | Path,
    model_dir: str | Path | TwoTowerModel,
    ks: tuple[int, ...] = KS,
    baselines: bool = True,
    tune_als: bool = False,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Test-split metrics of a model (a directory or a loaded one) and, with `baselines`, of popularity
    and ALS; `tune_als` adds "als_tuned": ALS with the grid point chosen on the validation split."""
    model = model_dir if isinstance(model_dir, TwoTowerModel) else TwoTowerModel.load(model_dir)
    p = prepared if prepared is not None else prepare(data, model.cfg.history_len)
    q = held_out(p, TEST)
    k = max(ks)
    result: dict[str, Any] = {"two_tower": metrics(two_tower_topk(model, p, q, k), q.targets, ks)}
    if baselines:
        result["popularity"] = metrics(popularity_topk(p, q, k), q.targets, ks)
        result["als"] = metrics(als_topk(p, q, k), q.targets, ks)
    if baselines and tune_als:
        result["als_tuned"] = _tuned_als_metrics(p, q, k, ks)
    result["model_version"] = model.version
    result["catalog_items"] = len(p.items)
    return result

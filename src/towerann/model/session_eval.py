"""The measured value of real-time clicks (`towerann eval --session`).

1. Next-item recall. Each test user's held-out interactions are replayed in time order. Before each
   next item, the query is the user tower's vector with the user's earlier held-out clicks in its
   history (what the feature store holds a second after each click: "with session"), or with the
   offline history only, frozen at the start of the held-out period ("without session"). Both rank
   the whole catalog minus what the user interacted with before that item, by exact search, and
   are scored on whether the next item is in the top 10 / 100.
2. How fast the candidates follow a change of interest. For sampled users, the category least shown
   in their top 100 is clicked n = 0, 1, 2, ... times (its most popular items, newest first in the
   history, as a live session would put them); the share of that category in the top 100 after each
   click, averaged over users, and the clicks it takes to pass 20% and 50%.
Deterministic for a seed (the sampled users; the model is fixed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from towerann.model.evaluate import held_out, rank_scores, user_queries
from towerann.model.model import TwoTowerModel
from towerann.model.prepare import TEST, Prepared, prepare

KS = (10, 100)
MAX_CLICKS = 10


def _catalog_codes(model: TwoTowerModel, p: Prepared) -> tuple[np.ndarray, np.ndarray]:
    return (
        model.item_vocab.encode(p.items["item_id"].to_numpy()),
        model.schema.categories.encode(p.items["category"].to_numpy()),
    )


def _hits(queries: np.ndarray, items: torch.Tensor, seen: list[np.ndarray], targets: np.ndarray, k: int) -> np.ndarray:
    """rank of each target within the top-k (exact, seen items excluded); -1 when not in it."""
    top = rank_scores(torch.from_numpy(queries) @ items.T, seen, k)
    match = top == targets[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), -1)


def next_item_recall(
    model: TwoTowerModel, p: Prepared, item_vectors: np.ndarray, max_users: int | None, seed: int
) -> dict[str, Any]:
    vocab, cats = _catalog_codes(model, p)
    test = np.flatnonzero(p.split == TEST)
    users = np.unique(p.user_key[test])
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    test = test[np.isin(p.user_key[test], users)]
    firsts = held_out(p, TEST).rows  # each user's first held-out interaction
    first_of_user = dict(zip(p.user_key[firsts], firsts.tolist()))
    user_start = {p.user_key[r]: int(r) for r in np.r_[0, np.flatnonzero(p.user_key[1:] != p.user_key[:-1]) + 1]}
    frozen = np.array([first_of_user[p.user_key[r]] for r in test], np.int64)
    seen = [np.unique(p.item_row[user_start[p.user_key[r]] : r]) for r in test]
    targets = p.item_row[test]
    items = torch.from_numpy(item_vectors)
    ranks: dict[str, list[np.ndarray]] = {"with_session": [], "without_session": []}
    for s in range(0, len(test), 1024):
        sl = slice(s, s + 1024)
        for name, rows in (("with_session", test[sl]), ("without_session", frozen[sl])):
            q = user_queries(model, p, rows, vocab, cats)
            ranks[name].append(_hits(q, items, seen[sl], targets[sl], max(KS)))
    out: dict[str, Any] = {"users": int(len(users)), "next_items": int(len(test))}
    for name, parts in ranks.items():
        r = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        out[name] = {f"recall@{k}": round(float(((r >= 0) & (r < k)).mean()) if len(r) else 0.0, 4) for k in KS}
    # Only the items after a user's first held-out one can differ: there the two queries are the same.
    later = test != frozen
    for name, parts in ranks.items():
        r = (np.concatenate(parts) if parts else np.zeros(0, np.int64))[later]
        out[name]["later_items"] = {
            f"recall@{k}": round(float(((r >= 0) & (r < k)).mean()) if len(r) else 0.0, 4) for k in KS
        }
    out["later_items"] = int(later.sum())
    return out


def interest_shift(
    model: TwoTowerModel,
    p: Prepared,
    item_vectors: np.ndarray,
    n_users: int,
    seed: int,
    k: int = 100,
    max_clicks: int = MAX_CLICKS,
) -> dict[str, Any]:
    vocab, cats = _catalog_codes(model, p)
    firsts = held_out(p, TEST).rows
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(firsts, min(n_users, len(firsts)), replace=False)) if len(firsts) else firsts
    category = p.items["category"].astype(str).to_numpy()
    before = p.split < TEST
    popularity = np.bincount(p.item_row[before], minlength=len(p.items))
    available = p.items["available"].to_numpy(bool) if "available" in p.items else np.ones(len(p.items), bool)
    names, counts = np.unique(category[available], return_counts=True)
    big = names[counts >= max_clicks * 2]  # categories with enough items to click
    items = torch.from_numpy(item_vectors)
    base = user_queries(model, p, rows, vocab, cats)
    top0 = torch.topk(torch.from_numpy(base) @ items.T, k, dim=1).indices.numpy()
    targets, clicks = [], np.full((len(rows), max_clicks), -1, np.int64)
    for i in range(len(rows)):
        shown = {c: 0 for c in big}
        for c in category[top0[i]]:
            if c in shown:
                shown[c] += 1
        target = min(big, key=lambda c: (shown[c], c))  # the least shown; ties by name: deterministic
        pool = np.flatnonzero((category == target) & available)
        picked = pool[np.argsort(-popularity[pool], kind="stable")][:max_clicks]
        clicks[i, : len(picked)] = picked
        targets.append(target)
    targets_arr = np.asarray(targets, dtype=object)
    num, cat = model.schema.encode_user_frame(p.users)
    known = p.user_row[rows] >= 0
    static_num = np.where(known[:, None], num[np.maximum(p.user_row[rows], 0)], 0).astype(np.float32)
    static_cat = np.where(known[:, None], cat[np.maximum(p.user_row[rows], 0)], 0)
    offline = p.hist_rows[rows]
    shares = np.zeros((len(rows), max_clicks + 1))
    for n in range(max_clicks + 1):
        # the n clicks newest first, then the offline history, cut to the tower's history length
        h = np.concatenate([clicks[:, :n][:, ::-1], offline], axis=1)[:, : offline.shape[1]]
        filled = h >= 0
        q = model.encode_users(
            p.user_key[rows],
            static_num,
            static_cat,
            np.where(filled, vocab[np.maximum(h, 0)], 0),
            np.where(filled, cats[np.maximum(h, 0)], 0),
            filled,
        )
        top = torch.topk(torch.from_numpy(q) @ items.T, k, dim=1).indices.numpy()
        shares[:, n] = (category[top] == targets_arr[:, None]).mean(axis=1) if len(rows) else 0.0
    mean = shares.mean(axis=0) if len(rows) else np.zeros(max_clicks + 1)

    def clicks_to(level: float) -> int | None:
        over = np.flatnonzero(mean > level)
        return int(over[0]) if len(over) else None

    return {
        "users": int(len(rows)),
        "k": k,
        "share_by_clicks": [round(float(x), 4) for x in mean],
        "clicks_to_20pct": clicks_to(0.2),
        "clicks_to_50pct": clicks_to(0.5),
    }


def evaluate_session(
    data: str | Path, model_dir: str | Path, max_users: int | None = 2000, shift_users: int = 200, seed: int = 0
) -> dict[str, Any]:
    model = TwoTowerModel.load(model_dir)
    p = prepare(data, model.cfg.history_len)
    vectors = model.encode_items(p.items)
    return {
        "model_version": model.version,
        "history_len": model.cfg.history_len,
        "next_item": next_item_recall(model, p, vectors, max_users, seed),
        "interest_shift": interest_shift(model, p, vectors, shift_users, seed),
    }


def plot(result: dict[str, Any]) -> Any:
    """The share-of-category curve (for bench.report.write_report)."""

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        shift = result["interest_shift"]
        ax1.plot(range(len(shift["share_by_clicks"])), shift["share_by_clicks"], marker="o")
        for level in (0.2, 0.5):
            ax1.axhline(level, ls="--", c="gray", lw=0.8)
        ax1.set_xlabel("clicks in a category the user was shown least of")
        ax1.set_ylabel(f"share of that category in the top {shift['k']}")
        ax1.set_title(f"{shift['users']} users: how fast candidates follow a new interest", fontsize=9)
        ni = result["next_item"]
        xs = np.arange(len(KS))
        for j, name in enumerate(("without_session", "with_session")):
            ax2.bar(xs + (j - 0.5) * 0.4, [ni[name][f"recall@{k}"] for k in KS], 0.4, label=name.replace("_", " "))
        ax2.set_xticks(xs, [f"recall@{k}" for k in KS])
        ax2.set_title(f"next-item recall, {ni['next_items']} held-out items of {ni['users']} users", fontsize=9)
        ax2.legend(fontsize=8)

    return draw

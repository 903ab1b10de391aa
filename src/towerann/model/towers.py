"""The two towers (PyTorch).

Item tower: item id + category + attributes -> L2-normalised vector.
User tower: user id + static features + the last N items (session history, pooled: a masked
mean plus the newest item on its own, so the click made a second ago moves the vector).
The towers share the item-id and category embedding tables, which lets the user tower read
history items in the same space the item tower writes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TowerConfig:
    dim: int = 128
    id_dim: int = 32
    category_dim: int = 16
    attr_dim: int = 8
    hidden: int = 256
    history_len: int = 20

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TowerSizes:
    """Vocabulary sizes (incl. the unknown bucket) and feature counts, from the schema."""

    n_items: int
    n_users: int
    n_categories: int
    item_attr_sizes: list[int]
    item_numeric: int
    user_attr_sizes: list[int]
    user_numeric: int

    def to_json(self) -> dict:
        return asdict(self)


class ItemTower(nn.Module):
    def __init__(self, cfg: TowerConfig, sizes: TowerSizes, item_emb: nn.Embedding, cat_emb: nn.Embedding):
        super().__init__()
        self.item_emb = item_emb
        self.cat_emb = cat_emb
        self.attr_embs = nn.ModuleList(nn.Embedding(n, cfg.attr_dim) for n in sizes.item_attr_sizes)
        width = cfg.id_dim + cfg.category_dim + cfg.attr_dim * len(sizes.item_attr_sizes) + sizes.item_numeric
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(
        self, item_idx: torch.Tensor, cat_idx: torch.Tensor, numeric: torch.Tensor, attrs: torch.Tensor
    ) -> torch.Tensor:
        parts = [self.item_emb(item_idx), self.cat_emb(cat_idx), numeric]
        parts += [emb(attrs[:, j]) for j, emb in enumerate(self.attr_embs)]
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class UserTower(nn.Module):
    def __init__(self, cfg: TowerConfig, sizes: TowerSizes, item_emb: nn.Embedding, cat_emb: nn.Embedding):
        super().__init__()
        self.user_emb = nn.Embedding(sizes.n_users, cfg.id_dim)
        self.item_emb = item_emb
        self.cat_emb = cat_emb
        self.attr_embs = nn.ModuleList(nn.Embedding(n, cfg.attr_dim) for n in sizes.user_attr_sizes)
        hist = cfg.id_dim + cfg.category_dim
        width = cfg.id_dim + cfg.attr_dim * len(sizes.user_attr_sizes) + sizes.user_numeric + 2 * hist
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(
        self,
        user_idx: torch.Tensor,
        numeric: torch.Tensor,
        attrs: torch.Tensor,
        hist_idx: torch.Tensor,
        hist_cat: torch.Tensor,
        hist_mask: torch.Tensor,
    ) -> torch.Tensor:
        """hist_* are [n, N], newest first; hist_mask is 1.0 where a history slot is filled."""
        hist = torch.cat([self.item_emb(hist_idx), self.cat_emb(hist_cat)], dim=2) * hist_mask.unsqueeze(2)
        pooled = hist.sum(dim=1) / hist_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        parts = [self.user_emb(user_idx), numeric, pooled, hist[:, 0, :]]
        parts += [emb(attrs[:, j]) for j, emb in enumerate(self.attr_embs)]
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class TwoTower(nn.Module):
    def __init__(self, cfg: TowerConfig, sizes: TowerSizes):
        super().__init__()
        self.cfg, self.sizes = cfg, sizes
        item_emb = nn.Embedding(sizes.n_items, cfg.id_dim)
        cat_emb = nn.Embedding(sizes.n_categories, cfg.category_dim)
        nn.init.normal_(item_emb.weight, std=0.05)
        nn.init.normal_(cat_emb.weight, std=0.05)
        self.item_tower = ItemTower(cfg, sizes, item_emb, cat_emb)
        self.user_tower = UserTower(cfg, sizes, item_emb, cat_emb)

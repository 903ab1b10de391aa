"""A catalog and a trained model as a part source: the item tower run a part at a time, on demand.

A resumable ivfpq build (index.ivfpq_resumable) reads its catalog a part at a time, up to three times a
part. `CatalogParts` makes each part by running the item tower over its catalog rows right then
(embed.runner.embed_rows: the same rows and the same vectors `towerann embed` writes for that part), so a
100M-item build from a real catalog and model never stores the 51 GB of float32 vectors that an embed run
would write first. Internal ids are catalog row numbers, as `towerann embed` gives them; categories are
the bundle's filter codes (embed.runner.filter_categories)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from towerann.data.vectors_dir import UNKNOWN_CATEGORY
from towerann.embed.runner import (
    catalog_fingerprint,
    embed_rows,
    filter_categories,
    open_catalog,
    resolve_items_file,
)
from towerann.errors import ConfigError
from towerann.model.model import TwoTowerModel

BATCH_ROWS = 16384  # rows per tower call (embed's default)


class CatalogParts:
    """Catalog rows [i * part_size, ...) embedded by the model's item tower when part i is asked for.
    It has the shape of index.ivfpq_resumable.PartSource."""

    def __init__(self, model_dir: str | Path, items: str | Path, part_size: int, batch_rows: int = BATCH_ROWS):
        if part_size < 1 or batch_rows < 1:
            raise ConfigError(f"part_size and batch_rows must be >= 1, got {part_size} and {batch_rows}")
        self.model_dir = Path(model_dir)
        self.model = TwoTowerModel.load(model_dir)
        self.file = resolve_items_file(items)
        self.columns = self.model.schema.item_columns()
        self.pf = open_catalog(self.file, self.columns)
        self.n = int(self.pf.metadata.num_rows)
        self.part_size, self.batch_rows = int(part_size), int(batch_rows)
        self.dim, self.metric = int(self.model.dim), str(self.model.metric)
        self.filter_vocab = filter_categories(self.pf, self.model)
        self.tower = self.model.net.item_tower.eval()
        self._tables: dict[str, np.ndarray] = {}

    @property
    def category_names(self) -> list[str]:
        """Names of the category codes `attributes` gives (a vectors directory's category_names)."""
        return [UNKNOWN_CATEGORY, *self.filter_vocab.values]

    def part_counts(self) -> list[int]:
        return [min(self.part_size, self.n - s) for s in range(0, self.n, self.part_size)]

    def part(self, i: int, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Part i's (float32 vectors, int64 row ids), embedded now (`verify`: a PartSource's; nothing stored)."""
        start = i * self.part_size
        stop = min(start + self.part_size, self.n)
        before = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)  # the tower is GEMM-bound: every core, as `embed` does
        try:
            vectors, _ = embed_rows(
                self.model,
                self.tower,
                self.pf,
                self.file,
                self.columns,
                start,
                stop,
                self.batch_rows,
                self.filter_vocab,
                {},
                torch.device("cpu"),
            )
        finally:
            torch.set_num_threads(before)
        return vectors, np.arange(start, stop, dtype=np.int64)

    def attributes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(category code int32, available bool) of catalog rows `ids`."""
        tables = self._read_tables()
        return tables["categories"][ids], tables["available"][ids]

    def external_ids(self) -> np.ndarray:
        """Every row's item id as the catalog has it (int64, or numpy strings)."""
        return self._read_tables()["external_ids"]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": "catalog-parts/1",
            "model_version": self.model.version,
            "catalog": catalog_fingerprint(self.file, self.pf),
            "part_size": self.part_size,
        }

    def _read_tables(self) -> dict[str, np.ndarray]:
        """The per-row tables, read once (at 100M rows: 0.5 GB of codes and flags, 0.8 GB of int64 ids)."""
        if not self._tables:
            table = self.pf.read(columns=["item_id", "category", "available"])
            ids = table.column("item_id")
            self._tables = {
                "external_ids": ids.to_numpy().astype(np.int64 if pa.types.is_integer(ids.type) else str),
                "categories": self.filter_vocab.encode_arrow(table.column("category")).astype(np.int32),
                "available": table.column("available").fill_null(False).to_numpy().astype(bool),
            }
        return self._tables

"""Brute force (numpy matmul + argpartition): the ground truth, and the right choice for small catalogs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from towerann.artifacts import save_npy
from towerann.index.base import Growable, Mask, SlotIndex, inner_products
from towerann.index.merge import topk_rows

# Queries scored per matmul block, so a large batch never materialises a huge [m, n] matrix.
BLOCK_ROWS = 256


class ExactIndex(SlotIndex):
    kind = "exact"
    default_search: ClassVar[dict[str, Any]] = {}
    filter_paths: tuple[str, ...] = ("exact",)  # its library search is brute force too

    def __init__(self, dim: int, metric: str = "ip"):
        super().__init__(dim, metric)
        self._vecs = Growable(np.empty((0, self.dim), np.float32))

    def describe(self) -> str:
        return "Flat"

    def _add_vectors(self, vectors: np.ndarray, first_slot: int, build: bool) -> None:
        self._vecs.extend(vectors)

    def _vectors(self) -> np.ndarray:
        return self._vecs.data

    def buffers(self) -> list[np.ndarray]:
        """The big buffer this index holds: its vectors (mapped from the snapshot, or in memory)."""
        return [self._vecs.data]

    def _search(
        self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        vecs = self._vecs.data
        if mask is not None and mask.count < len(vecs) // 2:
            vecs, labels = vecs[mask.idx], mask.idx  # few qualify: score only those
        else:
            labels = None
        blocks = []
        for s in range(0, len(q), BLOCK_ROWS):
            scores = inner_products(q[s : s + BLOCK_ROWS], vecs)
            if mask is not None and labels is None:
                scores = np.where(mask.bits, scores, np.float32(-np.inf))
            blocks.append(topk_rows(scores, k, labels))
        if len(blocks) == 1:
            return blocks[0]
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])

    def _save_backend(self, directory: Path) -> dict[str, Any]:
        save_npy(directory / "vectors.npy", self._vecs.data)
        return {"vectors": "vectors.npy"}

    def _load_backend(self, directory: Path, state: dict[str, Any]) -> None:
        self._vecs = self.load_saved_vectors(directory, state["vectors"], grows=True)

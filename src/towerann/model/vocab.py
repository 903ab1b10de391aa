"""Id vocabularies: external ids (int or str) -> dense indexes, 0 = unknown."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

DICT_MAX = 100_000  # single lookups: a dict up to this many ids, binary search in sorted ids above


class IdVocab:
    """Maps external ids to 1..n (0 for unknown). Bulk lookups go through pandas, single ones a dict."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids)
        if self.ids.dtype == object:
            self.ids = self.ids.astype(str)
        self._index = pd.Index(self.ids)
        self._dict: dict[str, int] | None = None
        self._by_value: tuple[np.ndarray, np.ndarray] | None = None  # (order, ids[order]), set in one step

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """Embedding rows needed: the ids plus the unknown bucket."""
        return len(self.ids) + 1

    def encode(self, values: Any) -> np.ndarray:
        values = np.asarray(values)
        if self.ids.dtype.kind in "iu" and values.dtype.kind not in "iu":
            values = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy()
        elif self.ids.dtype.kind == "U" and values.dtype.kind != "U":
            values = values.astype(str)
        return (self._index.get_indexer(values) + 1).astype(np.int64)

    def encode_one(self, value: Any) -> int:
        """Fast path for one id given as a string (as ids travel at request time)."""
        if len(self.ids) > DICT_MAX and self.ids.dtype.kind in "iuU":
            return self._search_one(str(value))
        if self._dict is None:
            self._dict = {str(v): i + 1 for i, v in enumerate(self.ids.tolist())}
        return self._dict.get(str(value), 0)

    def _search_one(self, value: str) -> int:
        """Binary search in the sorted ids: for big vocabularies, whose dict would cost ~100 MB and a
        GIL-holding build of ~0.5 s at the first request after a bundle swap."""
        if self._by_value is None:
            order = np.argsort(self.ids, kind="stable")
            self._by_value = (order, self.ids[order])
        order, sorted_ids = self._by_value
        key: Any = value
        if self.ids.dtype.kind in "iu":
            try:
                key = int(value)
            except ValueError:
                return 0
            if str(key) != value:  # the dict path's spelling rule: "7" is id 7, "007" is unknown
                return 0
        i = int(np.searchsorted(sorted_ids, key))
        return int(order[i]) + 1 if i < len(sorted_ids) and sorted_ids[i] == key else 0

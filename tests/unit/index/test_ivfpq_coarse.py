"""ivfpq's coarse quantizer: an HNSW graph over the centroids (coarse=hnsw; auto from HNSW_COARSE_LISTS
lists), so that assigning 100M vectors to 40k lists does not score every centroid for each."""

from __future__ import annotations

import numpy as np
import pytest

from towerann.data.synth_vectors import far_off_catalog
from towerann.errors import ConfigError
from towerann.index import create
from towerann.index.ivfpq import HNSW_COARSE_LISTS
from towerann.index.snapshot import load_snapshot, publish
from towerann.index.tune import recall_at_k

N, D, K = 12_000, 32, 20
PARAMS = {"nlist": 64, "pq_m": 8, "train_sample": 5000}


def test_an_hnsw_coarse_quantizer_finds_the_flat_ones_lists(tmp_path):
    cat = far_off_catalog(N, 100, D, seed=9)
    flat = create("ivfpq", D, **PARAMS)
    graph = create("ivfpq", D, coarse="hnsw", **PARAMS)
    for ix in (flat, graph):
        ix.build(cat.vectors, np.arange(N))
    assert "_HNSW32," in graph.describe() and "HNSW" not in flat.describe()  # auto: flat at 64 lists
    assert graph.memory()["resident_bytes"] > flat.memory()["resident_bytes"]  # the graph's links counted
    params = {"nprobe": 8, "rerank": 4 * K}
    a, b = flat.search(cat.queries, K, params=params), graph.search(cat.queries, K, params=params)
    assert recall_at_k(b.ids, a.ids) >= 0.99  # ef >= 2 x nprobe over 64 centroids: the same lists
    loaded = load_snapshot(publish(graph, tmp_path / "ix", "m"))
    assert "_HNSW32," in loaded.describe()
    assert np.array_equal(loaded.search(cat.queries, K, params=params).ids, b.ids)


def test_coarse_is_checked():
    assert HNSW_COARSE_LISTS > 12_649  # auto keeps the 10M catalog's flat quantizer (12,649 lists)
    with pytest.raises(ConfigError, match="coarse='graph': expected one of auto, flat, hnsw"):
        create("ivfpq", D, coarse="graph")

"""The far-off-query vector catalog (towerann.data.synth_vectors): seeded, skewed, its queries far from every item."""

from __future__ import annotations

import numpy as np
import pytest

from towerann.data.synth_vectors import far_off_catalog
from towerann.errors import ConfigError


@pytest.fixture(scope="module")
def cat():  # type: ignore[no-untyped-def]
    return far_off_catalog(6000, 200, 128, seed=3)


def test_same_seed_same_bytes_other_seed_other_arrays(cat) -> None:  # type: ignore[no-untyped-def]
    again = far_off_catalog(6000, 200, 128, seed=3)
    assert again.vectors.tobytes() == cat.vectors.tobytes()
    assert again.queries.tobytes() == cat.queries.tobytes()
    assert np.array_equal(again.clusters, cat.clusters) and again.params == cat.params
    other = far_off_catalog(6000, 200, 128, seed=4)
    assert not np.allclose(other.vectors, cat.vectors) and not np.allclose(other.queries, cat.queries)
    # more items than one draw step (CHUNK) still come out the same
    big = far_off_catalog(70_000, 5, 8, seed=1)
    assert big.vectors.tobytes() == far_off_catalog(70_000, 5, 8, seed=1).vectors.tobytes()


def test_shapes_unit_norm_and_zipf_skewed_clusters(cat) -> None:  # type: ignore[no-untyped-def]
    assert cat.vectors.shape == (6000, 128) and cat.queries.shape == (200, 128)
    assert cat.vectors.dtype == cat.queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cat.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cat.queries, axis=1), 1.0, atol=1e-5)
    sizes = np.sort(np.bincount(cat.clusters, minlength=cat.params["n_clusters"]))[::-1]
    assert cat.params["n_clusters"] == 16 and sizes.sum() == 6000
    assert sizes[0] > 8 * sizes[-1]  # Zipf 1.1 over 16 clusters: the largest ~21x the smallest
    assert cat.params["largest_cluster_share"] == pytest.approx(sizes[0] / 6000, abs=1e-4)


def test_power_law_spectrum(cat) -> None:  # type: ignore[no-untyped-def]
    ev = np.sort(np.linalg.eigvalsh(np.cov(cat.vectors.T)))[::-1]
    assert ev[0] > 4 * ev[len(ev) // 2] > 0  # variance concentrated in a few directions, none empty
    flat = far_off_catalog(6000, 10, 32, seed=3, spectrum=0.0, n_clusters=1)  # isotropic control
    ev_flat = np.sort(np.linalg.eigvalsh(np.cov(flat.vectors.T)))[::-1]
    assert ev_flat[0] < 1.5 * ev_flat[len(ev_flat) // 2]


def test_queries_are_far_from_every_item(cat) -> None:  # type: ignore[no-untyped-def]
    v = cat.vectors
    q_scores = np.sort(cat.queries @ v.T, axis=1)[:, ::-1]
    item_q = v[:200]
    i_scores = np.sort(item_q @ v.T, axis=1)[:, ::-1]
    near_item = i_scores[:, 1].mean()  # an item's nearest *other* item (the first is itself, at 1.0)
    near_query = q_scores[:, 0].mean()
    assert near_query < near_item - 0.1, (near_query, near_item)  # measured 0.52 vs 0.69 (300k items: 0.50 vs 0.88)

    # and their neighbourhoods mix clusters: the top 50 of a query come from more clusters than an item's
    def clusters_in_top(queries: np.ndarray) -> float:
        top = np.argsort(-(queries @ v.T), axis=1)[:, :50]
        return float(np.mean([len(np.unique(cat.clusters[t])) for t in top]))

    assert clusters_in_top(cat.queries) > clusters_in_top(item_q) + 0.5
    # mix=(1, 1) and no noise: the queries are items themselves (the generator's knobs do what they say)
    same = far_off_catalog(6000, 50, 128, seed=3, mix=(1, 1), noise=0.0)
    assert np.allclose(np.max(same.queries @ same.vectors.T, axis=1), 1.0, atol=1e-5)


def test_bad_parameters_are_refused() -> None:
    for kw in ({"mix": (0, 3)}, {"mix": (4, 2)}, {"spread": 0.0}, {"noise": -1.0}, {"n_clusters": 0}):
        with pytest.raises(ConfigError):
            far_off_catalog(100, 5, 8, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        far_off_catalog(1, 5, 8)

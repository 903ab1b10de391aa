"""embed.parts.CatalogParts: a catalog and its model as a part source for the resumable build - the item
tower run a part at a time when asked, giving the vectors, ids and filter codes `towerann embed` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from towerann.data.vectors_dir import read_vectors
from towerann.embed.parts import CatalogParts
from towerann.errors import ConfigError


def test_parts_are_the_vectors_embed_writes(serving_bundle: dict[str, Path]) -> None:
    src = CatalogParts(serving_bundle["model"], serving_bundle["data"], part_size=700)
    written = read_vectors(serving_bundle["vectors"])
    assert src.part_counts() == [700, 700, 600] and (src.dim, src.metric) == (written.dim, written.metric)
    parts = [src.part(i) for i in (2, 0, 1)]  # any order: a part depends on its rows alone
    vectors = np.concatenate([parts[1][0], parts[2][0], parts[0][0]])
    ids = np.concatenate([parts[1][1], parts[2][1], parts[0][1]])
    assert ids.tolist() == written.ids.tolist() == list(range(2000))  # ids are catalog rows
    # the same tower over the same rows; other batch shapes may move the last bits of a GEMM
    np.testing.assert_allclose(vectors, written.vectors, rtol=1e-5, atol=1e-6)
    cats, available = src.attributes(ids)
    assert cats.tolist() == written.categories.tolist() and available.tolist() == written.available.tolist()
    assert src.category_names == written.category_names
    assert src.external_ids().tolist() == written.external_ids.tolist()


def test_the_fingerprint_names_model_catalog_and_part_size(serving_bundle: dict[str, Path]) -> None:
    a = CatalogParts(serving_bundle["model"], serving_bundle["data"], part_size=700).fingerprint()
    b = CatalogParts(serving_bundle["model"], serving_bundle["data"], part_size=800).fingerprint()
    assert a["model_version"] == b["model_version"] and a["catalog"] == b["catalog"] and a != b
    with pytest.raises(ConfigError, match="part_size"):
        CatalogParts(serving_bundle["model"], serving_bundle["data"], part_size=0)


def test_bench_pq_catalog_embeds_with_a_given_model_and_trains_none(
    tmp_path: Path, serving_bundle: dict[str, Path]
) -> None:
    """--model DIR: a model trained elsewhere (at 100M items training would score the whole catalog) embeds
    the catalog; none is trained, and one of another dim is a one-line error."""
    from towerann.bench.compressed import catalog_parts
    from towerann.model.model import model_version_of

    args = (tmp_path, 3000, 200)
    src, queries = catalog_parts(*args, 32, 1000, 50, 0, 10.0, serving_bundle["model"])
    assert src.fingerprint()["model_version"] == model_version_of(serving_bundle["model"])
    assert queries.shape == (50, 32) and src.part_counts() == [1000] * 3
    assert not list(tmp_path.glob("catalog-*/model"))  # nothing trained
    with pytest.raises(ConfigError, match="vectors of dim 32, not --dim 16"):
        catalog_parts(*args, 16, 1000, 50, 0, 10.0, serving_bundle["model"])

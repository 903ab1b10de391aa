"""POST /v1/candidates with a query_vector (a caller that runs the user tower in its own stack): on a bundle
whose vectors came from a Parquet file, the answers equal exact search done by hand, filters included;
a wrong dim, NaN, inf, both or neither of user_id/query_vector get a 4xx JSON error."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerann.client import Client
from towerann.config import Config, FeaturesConfig, PathsConfig, ServeConfig
from towerann.data.dataset import read_items
from towerann.data.external_vectors import import_vectors
from towerann.data.vectors_dir import read_vectors
from towerann.errors import BadRequest
from towerann.freshness.publish import publish_bundle
from towerann.model.model import model_version_of
from towerann.server.server import start_background


@pytest.fixture(scope="module")
def parquet_bundle(bundle_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("qv")
    items = read_items(bundle_paths["data"])
    rng = np.random.default_rng(11)
    dim = read_vectors(bundle_paths["vectors"]).dim
    vectors = rng.standard_normal((len(items), dim)).astype(
        np.float32
    )  # not the model's: the answers must follow these
    available = rng.random(len(items)) > 0.1
    flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    pq.write_table(
        pa.table(
            {"sku": items["item_id"].to_numpy(), "emb": flat, "cat": items["category"].to_numpy(), "live": available}
        ),
        work / "vectors.parquet",
    )
    imported = read_vectors(
        import_vectors(
            work / "vectors.parquet",
            work / "vectors",
            id_column="sku",
            vector_column="emb",
            category_column="cat",
            available_column="live",
        )
    )
    # The vectors are another stack's; the bundle pairs them with a model of their dim (its user tower
    # serves user_id requests, which this test does not make).
    paired = dataclasses.replace(imported, model_version=model_version_of(bundle_paths["model"]))
    publish_bundle(work / "indexes", bundle_paths["model"], paired, kind="exact")
    cfg = Config(
        serve=ServeConfig(max_k=100),
        paths=PathsConfig(index=str(work / "indexes"), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store="memory"),
    )
    handle = start_background(cfg)
    yield {
        "url": handle.url,
        "vectors": vectors,
        "ids": items["item_id"].to_numpy(),
        "cats": items["category"].to_numpy(),
        "available": available,
        "dim": dim,
    }
    handle.stop()


def by_hand(c: dict[str, Any], q: np.ndarray, k: int, allowed: np.ndarray) -> list[int]:
    scores = np.where(allowed, c["vectors"] @ q, -np.inf)
    return c["ids"][np.argsort(-scores, kind="stable")[:k]].tolist()


def test_query_vector_answers_equal_exact_search_by_hand(parquet_bundle) -> None:
    c = parquet_bundle
    rng = np.random.default_rng(12)
    cat = str(c["cats"][0])
    with Client(c["url"]) as client:
        for _ in range(3):
            q = rng.standard_normal(c["dim"]).astype(np.float32)
            got = httpx.post(f"{c['url']}/v1/candidates", json={"query_vector": q.tolist(), "k": 50}).json()
            assert [x["item_id"] for x in got["candidates"]] == by_hand(c, q, 50, c["available"])
            assert [x["score"] for x in got["candidates"]] == pytest.approx(
                np.sort(np.where(c["available"], c["vectors"] @ q, -np.inf))[::-1][:50].tolist(), rel=1e-5
            )
            filtered = client.candidates(query_vector=q, k=50, categories=[cat])
            want = by_hand(c, q, 50, c["available"] & (c["cats"] == cat))
            assert filtered.item_ids == want and not filtered.degraded
            assert len(want) == min(50, int((c["available"] & (c["cats"] == cat)).sum()))  # exact k, or every match


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"query_vector": [0.1] * 5, "k": 5}, 400, "dim"),
        ({"k": 5}, 400, "give user_id, or query_vector"),
        ({"user_id": "7", "query_vector": "DIM", "k": 5}, 400, "not both"),
        ({"query_vector": ["a"] * 3, "k": 5}, 422, "query_vector"),
    ],
)
def test_bad_query_vectors_get_4xx_json(parquet_bundle, body, status, says) -> None:
    c = parquet_bundle
    if body.get("query_vector") == "DIM":
        body = {**body, "query_vector": [0.0] * c["dim"]}
    r = httpx.post(f"{c['url']}/v1/candidates", json=body)
    assert r.status_code == status and says in r.json()["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_nan_and_inf_in_a_query_vector_get_400(parquet_bundle, literal) -> None:
    c = parquet_bundle
    values = ", ".join(["0.5"] * (c["dim"] - 1) + [literal])
    r = httpx.post(
        f"{c['url']}/v1/candidates",
        content=f'{{"query_vector": [{values}], "k": 5}}',
        headers={"content-type": "application/json"},
    )
    assert 400 <= r.status_code < 500 and "error" in r.json()
    with Client(c["url"]) as client, pytest.raises(BadRequest, match="NaN or infinite"):
        client.candidates(query_vector=[0.5] * (c["dim"] - 1) + [float("nan")], k=5)

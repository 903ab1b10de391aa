"""Feast on the request path: the dataset's users materialized into a Feast repo (integer join key, its own
feature names) and served over real HTTP answer exactly as the same features from the embedded store.
Skipped where feast is not installed (pip install 'towerann[feast]')."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("feast")

from towerann.config import Config, FeaturesConfig, PathsConfig, ServeConfig  # noqa: E402
from towerann.data.dataset import read_users  # noqa: E402
from towerann.features import open_store  # noqa: E402
from towerann.server.server import start_background  # noqa: E402
from towerann.server.wiring import open_retriever  # noqa: E402

DEFINITIONS = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource
from feast.types import Float32, Int64, String
from feast.value_type import ValueType

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
demographics = FeatureView(
    name="demographics", entities=[customer], ttl=timedelta(days=3650), online=True,
    source=FileSource(path="data/customers.parquet", timestamp_field="ts"),
    schema=[
        Field(name="customer_id", dtype=Int64), Field(name="years", dtype=Float32), Field(name="land", dtype=String)
    ])
"""


def test_features_from_feast_serve_as_the_same_features_from_the_embedded_store(bundle_paths, tmp_path) -> None:
    import pandas as pd

    users = read_users(bundle_paths["data"])
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "feature_store.yaml").write_text(
        "project: towerann_serving\nregistry: data/registry.db\nprovider: local\n"
        "online_store:\n  type: sqlite\n  path: data/online.db\n"
        "entity_key_serialization_version: 3\n"
    )
    (repo / "definitions.py").write_text(DEFINITIONS)
    (repo / "towerann.toml").write_text(
        'entity = "customer_id"\nentity_type = "int"\nsessions = "memory"\n'
        '[features]\nage = "demographics:years"\ncountry = "demographics:land"\n'
    )
    pd.DataFrame(
        {
            "customer_id": users["user_id"],
            "years": users["age"],
            "land": users["country"],
            "ts": pd.Timestamp("2026-01-01", tz="UTC"),
        }
    ).to_parquet(repo / "data" / "customers.parquet")
    feast = str(Path(sys.executable).with_name("feast"))
    for args in (
        ["apply"],
        ["materialize", "2025-01-01T00:00:00", pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S")],
    ):
        subprocess.run([feast, *args], cwd=repo, check=True, capture_output=True, timeout=120)

    cfg = Config(
        serve=ServeConfig(),
        paths=PathsConfig(index=str(bundle_paths["index"]), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store="memory", timeout_ms=5000),
    )  # no degraded answer on a loaded machine
    embedded = open_store("memory")
    embedded.put_users(
        {"user_id": str(u), "age": a, "country": c} for u, a, c in zip(users["user_id"], users["age"], users["country"])
    )
    asked = [str(u) for u in users["user_id"][:5]]
    answers = {}
    for name, store in (("feast", open_store(f"feast:{repo}")), ("embedded", embedded), ("none", open_store("memory"))):
        handle = start_background(cfg, retriever=open_retriever(cfg, store=store))
        try:
            answers[name] = [
                httpx.post(f"{handle.url}/v1/candidates", json={"user_id": u, "k": 20}).json() for u in asked
            ]
        finally:
            handle.stop()
            store.close()
    assert [a["degraded"] for a in answers["feast"]] == [False] * len(asked)
    for f, e in zip(answers["feast"], answers["embedded"]):
        assert [c["item_id"] for c in f["candidates"]] == [c["item_id"] for c in e["candidates"]]
        assert [c["score"] for c in f["candidates"]] == pytest.approx([c["score"] for c in e["candidates"]], abs=1e-6)
        assert f["degraded"] is False
    # and the features did matter: without them the scores differ
    assert any(
        [c["score"] for c in f["candidates"]] != pytest.approx([c["score"] for c in n["candidates"]], abs=1e-6)
        for f, n in zip(answers["feast"], answers["none"])
    )

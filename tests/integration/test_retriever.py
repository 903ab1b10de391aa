"""The Retriever and the retrieval bundle, with real files and both real feature stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from towerann.data.dataset import read_items
from towerann.errors import ArtifactError, BadRequest, IndexIncompatible, NotFound
from towerann.features import open_store
from towerann.features.loader import load_dataset_features
from towerann.freshness.publish import publish_bundle
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.retriever import Retriever


@pytest.fixture(scope="module")
def bundle(serving_bundle: dict[str, Path]) -> RetrievalBundle:
    return RetrievalBundle.load(serving_bundle["index"])


@pytest.fixture(scope="module")
def item_category(serving_bundle: dict[str, Path]) -> dict[int, str]:
    items = read_items(serving_bundle["data"])
    return dict(zip(items["item_id"].tolist(), items["category"].tolist()))


@pytest.fixture
def retriever(bundle: RetrievalBundle) -> Retriever:
    return Retriever(BundleHolder(bundle), open_store("memory"), max_k=500)


def test_candidates_count_equals_k_and_sorted(retriever: Retriever) -> None:
    for k in (1, 10, 500):
        c = retriever.candidates("3", k)
        assert len(c.item_ids) == k == len(c.scores) == len(set(c.item_ids))
        assert c.scores == sorted(c.scores, reverse=True)
    assert all(isinstance(i, int) for i in c.item_ids)  # the catalog's int ids, not internal ids
    assert set(c.timings_ms) == {"features", "user_tower", "ann", "total"}


def test_filter_by_category_returns_only_those(retriever: Retriever, item_category: dict[int, str]) -> None:
    c = retriever.candidates("3", 50, {"categories": ["cat_0004", "cat_0007"]})
    assert len(c.item_ids) == 50
    assert {item_category[i] for i in c.item_ids} <= {"cat_0004", "cat_0007"}
    with pytest.raises(BadRequest, match="unknown category 'cat_9999'; known ones include cat_") as e:
        retriever.candidates("3", 5, {"categories": ["cat_9999"]})
    assert "<unknown>" not in str(e.value)
    with pytest.raises(BadRequest, match=r"^filter\.brand: not a filter of this bundle; it filters on categories$"):
        retriever.candidates("3", 5, {"brand": ["x"]})


def test_unavailable_items_never_returned(retriever: Retriever, serving_bundle: dict[str, Path]) -> None:
    items = read_items(serving_bundle["data"])
    hidden = set(items.loc[~items["available"], "item_id"].tolist())
    assert hidden  # the synthetic catalog has unavailable items
    assert not hidden & set(retriever.candidates("3", 500).item_ids)


def test_cold_start_unknown_user(retriever: Retriever, item_category: dict[int, str]) -> None:
    cold = retriever.candidates("never-seen", 20)
    assert len(cold.item_ids) == 20
    retriever.record_event("never-seen", "1")  # session history only; counted at once (read-your-writes)
    warm = retriever.candidates("never-seen", 20)
    assert warm.item_ids != cold.item_ids


def test_bad_k_and_unknown_item(retriever: Retriever) -> None:
    for k in (0, -1, 501, True, 2.0):
        with pytest.raises(BadRequest, match="between 1 and 500"):
            retriever.candidates("3", k)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="not in the served catalog"):
        retriever.record_event("3", "no-such-item")


def test_both_stores_see_history(
    bundle: RetrievalBundle, serving_bundle: dict[str, Path], redis_server: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Known users' offline history and static features flow through either store alike."""
    got = {}
    for name, store in (
        ("embedded", open_store("embedded", path=tmp_path / "f.sqlite")),
        ("redis", open_store(redis_server, prefix=redis_prefix)),
    ):
        try:
            load_dataset_features(store, serving_bundle["data"])
            r = Retriever(BundleHolder(bundle), store)
            got[name] = r.candidates("7", 30).item_ids
            assert got[name] != r.candidates("unknown-user", 30).item_ids  # history and static features count
            r.record_event("7", "1")
            assert store.get_one("7").session[0].item_id == "1"
        finally:
            store.close()
    assert got["embedded"] == got["redis"]


def test_version_mismatch_refused_at_load(serving_bundle: dict[str, Path], tmp_path: Path) -> None:
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    other = train(
        serving_bundle["data"],
        tmp_path / "other-model",
        TowerConfig(dim=32),
        TrainConfig(epochs=1, seed=1),
        name="other",
        progress=False,
    )
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(RetrievalBundle.load(serving_bundle["index"]).path, bundle_dir)
    shutil.rmtree(bundle_dir / "model")
    shutil.copytree(tmp_path / "other-model", bundle_dir / "model")  # a user tower from another training run
    with pytest.raises(IndexIncompatible, match=other.version):
        RetrievalBundle.load(bundle_dir)
    with pytest.raises(IndexIncompatible, match="embed the catalog with this model"):
        publish_bundle(tmp_path / "root", tmp_path / "other-model", serving_bundle["vectors"])


def test_plain_snapshot_needs_model_and_holder_swaps(
    serving_bundle: dict[str, Path], bundle: RetrievalBundle, tmp_path: Path
) -> None:
    from towerann.data.vectors_dir import read_vectors
    from towerann.index import create
    from towerann.index.snapshot import publish

    vs = read_vectors(serving_bundle["vectors"])
    index = create("exact", vs.dim)
    index.build(vs.vectors, vs.ids, vs.categories, vs.available)
    snap = publish(index, tmp_path / "plain", vs.model_version, extra={"vectors_dir": str(serving_bundle["vectors"])})
    with pytest.raises(ArtifactError, match="--model"):
        RetrievalBundle.load(snap)
    plain = RetrievalBundle.load(snap, model_dir=serving_bundle["model"])
    holder = BundleHolder(bundle)
    seen: list[str] = []
    holder.subscribe(lambda b: seen.append(b.version))
    r = Retriever(holder, open_store("memory"))
    before = r.candidates("3", 10)
    assert holder.swap(plain) is bundle
    after = r.candidates("3", 10)
    assert (before.index_version, after.index_version) == (bundle.version, plain.version)
    assert after.item_ids == before.item_ids  # same vectors, same exact index: same answer
    assert seen == [bundle.version, plain.version]


def test_readyz_is_503_until_a_bundle_is_loaded(bundle: RetrievalBundle) -> None:
    """An app on an empty holder is up (healthz) but not ready; requests get a 503 that says why;
    the first swap makes it ready and serving, with the bundle's versions. (In-process ASGI calls.)"""
    import asyncio

    import httpx

    from towerann.serving.app import create_app

    holder = BundleHolder()
    app = create_app(Retriever(holder, open_store("memory")))

    async def calls() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://towerann") as client:
            assert (await client.get("/healthz")).status_code == 200
            r = await client.get("/readyz")
            assert r.status_code == 503 and "no retrieval bundle" in r.json()["error"]
            r = await client.post("/v1/candidates", json={"user_id": "3", "k": 5})
            assert r.status_code == 503 and "no retrieval bundle" in r.json()["error"]
            assert (await client.post("/v1/events", json={"user_id": "3", "item_id": "1"})).status_code == 503
            holder.swap(bundle)
            r = await client.get("/readyz")
            assert r.status_code == 200 and r.json()["index_version"] == bundle.version
            assert r.json()["model_version"] == bundle.model_version
            r = await client.post("/v1/candidates", json={"user_id": "3", "k": 5})
            assert r.status_code == 200 and len(r.json()["candidates"]) == 5
            assert r.json()["index_version"] == bundle.version
            metrics = (await client.get("/metrics")).text
            assert 'towerann_http_requests_total{route="/readyz",status="503"} 1.0' in metrics

    asyncio.run(calls())

"""End to end over real HTTP on loopback: clicks move candidates, metrics move, schema is served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pandas as pd
import pytest

from towerann.data.dataset import read_interactions, read_items


@pytest.fixture(scope="module")
def items(bundle_paths: dict[str, Path]) -> pd.DataFrame:
    """The catalog with each item's interaction count (clicks go to popular items, as real clicks do)."""
    frame = read_items(bundle_paths["data"])
    counts = read_interactions(bundle_paths["data"])["item_id"].value_counts()
    return frame.assign(pop=frame["item_id"].map(counts).fillna(0)).sort_values("pop", ascending=False)


def category_share(candidates: list[dict], item_category: dict[int, str], category: str) -> float:
    return sum(item_category[c["item_id"]] == category for c in candidates) / len(candidates)


def clicks_shift_toward(url: str, items: pd.DataFrame, user: str, k: int = 50) -> tuple[float, float]:
    """Click 10 items of the user's least-recommended big category; return its share before and after."""
    item_category = dict(zip(items["item_id"].tolist(), items["category"].tolist()))
    before = httpx.post(f"{url}/v1/candidates", json={"user_id": user, "k": k}).json()["candidates"]
    counts = items[items["available"]]["category"].value_counts()
    big = counts[counts >= 50].index
    category = min(big, key=lambda c: category_share(before, item_category, c))
    clicked = items[(items["category"] == category) & items["available"]]["item_id"].head(10)  # most popular
    for item in clicked:
        r = httpx.post(f"{url}/v1/events", json={"user_id": user, "item_id": str(item), "type": "click"})
        assert r.status_code == 200, r.text
    after = httpx.post(f"{url}/v1/candidates", json={"user_id": user, "k": k}).json()["candidates"]
    return category_share(before, item_category, category), category_share(after, item_category, category)


def test_clicks_move_candidates_toward_the_clicked_category(server, items) -> None:
    before, after = clicks_shift_toward(server.url, items, "7")
    assert after >= before + 0.3, (before, after)


def test_candidates_response_shape(server, items) -> None:
    r = httpx.post(
        f"{server.url}/v1/candidates",
        json={"user_id": "12", "k": 25, "filter": {"categories": ["cat_0001", "cat_0002"]}},
    )
    assert r.status_code == 200
    body = r.json()
    assert len(body["candidates"]) == 25
    cats = dict(zip(items["item_id"].tolist(), items["category"].tolist()))
    assert {cats[c["item_id"]] for c in body["candidates"]} <= {"cat_0001", "cat_0002"}
    scores = [c["score"] for c in body["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timings_ms"]) == {"features", "user_tower", "ann", "total"}
    assert body["model_version"] and body["index_version"]


def test_health_ready_and_openapi(server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["items"] == 2000
    assert ready.json()["degraded"] is False and ready.json()["dependencies"] == {"features": "up", "delta_log": "up"}
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/candidates", "/v1/events"} <= set(schema["paths"])
    req = schema["components"]["schemas"]["CandidatesRequest"]
    assert set(req["required"]) == {"k"} and {"user_id", "query_vector"} <= set(req["properties"])


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_after_requests(server) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    for _ in range(3):
        assert httpx.post(f"{server.url}/v1/candidates", json={"user_id": "1", "k": 5}).status_code == 200
    assert httpx.post(f"{server.url}/v1/candidates", json={"user_id": "1", "k": 0}).status_code == 400
    after = httpx.get(f"{server.url}/metrics").text
    ok = "towerann_http_requests_total"
    assert (
        _sample(after, ok, route="/v1/candidates", status="200")
        - _sample(before, ok, route="/v1/candidates", status="200")
        == 3
    )
    assert (
        _sample(after, ok, route="/v1/candidates", status="400")
        - _sample(before, ok, route="/v1/candidates", status="400")
        == 1
    )
    for stage in ("features", "user_tower", "ann", "total"):
        n0 = _sample(before, "towerann_stage_seconds_count", stage=stage)
        assert _sample(after, "towerann_stage_seconds_count", stage=stage) - n0 == 3
    assert _sample(after, "towerann_index_items") == 2000
    assert "towerann_bundle_info{" in after


def test_no_filesystem_path_reaches_an_unauthenticated_caller(
    bundle_paths, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """/readyz showed the bundle's absolute path, and a 503 of /v1/events the feature store's file: paths stay
    in the server's log. The token is configured, but no request here carries it."""
    from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
    from towerann.freshness.publish import publish_bundle
    from towerann.server.server import start_background

    bundle = publish_bundle(tmp_path / "indexes", bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    (tmp_path / "token").write_text("paths-token-1c7e")
    cfg = Config(
        serve=ServeConfig(max_k=200),
        paths=PathsConfig(index=str(tmp_path / "indexes"), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store="embedded", path=str(tmp_path / "features.sqlite")),
        freshness=FreshnessConfig(
            adopt_log=True, delta_path=str(tmp_path / "delta.sqlite"), token_file=str(tmp_path / "token"), poll_s=0.0
        ),
    )
    handle = start_background(cfg)
    # tmp_path, the bundle and the model directory all lie under the session's base directory
    secrets = {str(tmp_path_factory.getbasetemp()), str(tmp_path), str(bundle), str(bundle.resolve())}
    seen = []
    try:
        with httpx.Client(base_url=handle.url) as http:

            def answers() -> list[httpx.Response]:
                return [
                    http.get("/healthz"),
                    http.get("/readyz"),
                    http.get("/metrics"),
                    http.get("/openapi.json"),
                    http.get("/nope"),
                    http.post("/v1/candidates", json={"user_id": "3", "k": 5}),
                    http.post("/v1/candidates", json={"user_id": "3", "k": 0}),
                    http.post("/v1/candidates", json={"user_id": "3", "k": 5, "filter": {"colour": ["red"]}}),
                    http.post("/v1/events", json={"user_id": "3", "item_id": "5"}),
                    http.post("/v1/events", json={"user_id": "3", "item_id": "no-such"}),
                    http.post("/v1/items", json={"items": [{"item_id": "1"}]}),
                    http.delete("/v1/items/1"),
                    http.post("/v1/admin/reload"),
                    http.get("/v1/admin/recall"),
                ]

            seen += answers()
            assert seen[1].status_code == 200 and seen[1].json()["index_version"] == bundle.name
            assert "path" not in seen[1].json()
            handle.retriever.store.close()  # the feature store gone: degraded answers and 503s name no file
            later = answers()
            assert later[5].status_code == later[8].status_code == 503, (later[5].text, later[8].text)
            seen += later
    finally:
        handle.stop()
    for r in seen:
        assert not any(s in r.text for s in secrets), (r.request.method, r.request.url.path, r.text[:300])

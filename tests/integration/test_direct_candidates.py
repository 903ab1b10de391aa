"""POST /v1/candidates answered by GuardMiddleware's direct path (serving.app.direct_candidates), which skips
FastAPI's routing and body layers: the same answers, headers and errors as the routed app, and a body the
direct path does not take still reaches the routed app. (In-process ASGI calls.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from towerann.features import open_store
from towerann.serving.app import GuardMiddleware, create_app
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.retriever import Retriever

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def bundle(serving_bundle: dict[str, Path]) -> RetrievalBundle:
    return RetrievalBundle.load(serving_bundle["index"])


def _app(bundle: RetrievalBundle) -> Any:
    return create_app(Retriever(BundleHolder(bundle), open_store("memory"), max_k=200))


def _guard(app: Any) -> GuardMiddleware:
    """The app's GuardMiddleware (Starlette builds the middleware stack on the first call)."""
    layer = app.middleware_stack
    while not isinstance(layer, GuardMiddleware):
        layer = layer.app
    return layer


def _calls(app: Any, requests: list[tuple[str, dict[str, str]]], before: Callable[[Any], None] | None = None) -> list:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://towerann") as client:
            await client.get("/healthz")  # builds the middleware stack
            if before is not None:
                before(app)
            return [await client.post("/v1/candidates", content=body, headers=headers) for body, headers in requests]

    return asyncio.run(run())


def _comparable(r: httpx.Response) -> tuple[int, str | None, Any]:
    body = r.json()
    body.pop("timings_ms", None)  # a stopwatch's readings
    return r.status_code, r.headers.get("content-type"), body


REQUESTS = [
    ('{"user_id": "3", "k": 50}', JSON),
    ('{"user_id": 3, "k": 7, "filter": {"categories": ["cat_0001", "cat_0002"]}}', JSON),
    ('{"user_id": "no-such-user", "k": 5}', JSON),  # cold start
    ('{"user_id": "3", "k": 0}', JSON),  # the Retriever's 400
    ('{"user_id": "3", "k": 5, "surprise": 1}', JSON),  # the model's 422
    ('{"user_id": "3", "k": 1e999}', JSON),  # json reads infinity, orjson refuses
    ('{"user_id": "3", "k": 5}', {"content-type": "application/merge-patch+json"}),  # JSON to FastAPI too
    ('["3", 5]', JSON),
    ("{not json", JSON),
]


def test_direct_and_routed_answers_are_the_same(bundle: RetrievalBundle) -> None:
    direct = _calls(_app(bundle), REQUESTS)
    routed = _calls(_app(bundle), REQUESTS, before=lambda app: setattr(_guard(app), "direct", None))
    assert [r.status_code for r in direct] == [200, 200, 200, 400, 422, 422, 200, 400, 400]
    assert [_comparable(r) for r in direct] == [_comparable(r) for r in routed]
    assert [list(r.headers) for r in direct] == [list(r.headers) for r in routed]  # names, in order
    assert all(int(r.headers["content-length"]) == len(r.content) for r in direct)
    assert len(direct[0].json()["candidates"]) == 50


def test_a_valid_request_never_reaches_the_routed_app_and_the_rest_do(bundle: RetrievalBundle) -> None:
    def routed_app_fails(app: Any) -> None:
        async def refuse(scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("the routed app was called")

        _guard(app).app = refuse  # GuardMiddleware answers its exception with a 500

    app = _app(bundle)
    answers = _calls(
        app,
        [
            ('{"user_id": "3", "k": 5}', JSON),
            ('{"user_id": "3", "k": 0}', JSON),  # the Retriever's own error: answered directly too
            ('{"user_id": "3", "k": 5, "surprise": 1}', JSON),  # not the direct path's to answer
            ('{"user_id": "3", "k": 5}', {"content-type": "text/plain"}),
        ],
        before=routed_app_fails,
    )
    assert [r.status_code for r in answers] == [200, 400, 500, 500]
    expected = app.state.retriever.candidates("3", 5)
    assert [c["item_id"] for c in answers[0].json()["candidates"]] == expected.item_ids

"""Every kind of bad input gets a 4xx with a JSON {"error": ...}, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

GOOD = {"user_id": "3", "k": 5}


@pytest.mark.parametrize("body, status, words", [
    ({"k": 5}, 422, "user_id"),
    ({"user_id": "3"}, 422, "k"),
    ({"user_id": "3", "k": 0}, 400, "between 1 and 200"),
    ({"user_id": "3", "k": -4}, 400, "between 1 and 200"),
    ({"user_id": "3", "k": 201}, 400, "between 1 and 200"),
    ({"user_id": 3, "k": 5}, 422, "user_id"),
    ({"user_id": "3", "k": "5"}, 422, "k"),
    ({"user_id": "3", "k": 5.5}, 422, "k"),
    ({"user_id": "", "k": 5}, 422, "user_id"),
    ({"user_id": "3", "k": 5, "extra": 1}, 422, "extra"),
    ({"user_id": "3", "k": 5, "filter": {"categories": ["nope"]}}, 400, "unknown category 'nope'"),
    ({"user_id": "3", "k": 5, "filter": {"categories": "cat_0001"}}, 422, "categories"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_candidates_requests(server, body, status, words) -> None:
    r = httpx.post(f"{server.url}/v1/candidates", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize("body, status, words", [
    ({"user_id": "3", "item_id": "no-such-item"}, 404, "not in the served catalog"),
    ({"user_id": "3", "item_id": 5}, 422, "item_id"),
    ({"user_id": "3"}, 422, "item_id"),
    ({"user_id": "3", "item_id": "5", "ts": -1}, 400, "ts"),
    ({"user_id": "3", "item_id": "5", "type": ""}, 422, "type"),
])
def test_bad_events(server, body, status, words) -> None:
    r = httpx.post(f"{server.url}/v1/events", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_malformed_json(server) -> None:
    r = httpx.post(f"{server.url}/v1/candidates", content=b'{"user_id": "3", "k": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_oversized_bodies(server) -> None:
    big = b'{"user_id": "' + b"x" * 2000 + b'", "k": 5}'
    declared = httpx.post(f"{server.url}/v1/candidates", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "over 1024 bytes" in declared.json()["error"]

    def chunks():  # no Content-Length: chunked transfer, so only the actual size can tell
        for _ in range(8):
            yield b" " * 200
        yield b'{"user_id": "3", "k": 5}'

    streamed = httpx.post(f"{server.url}/v1/candidates", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_unknown_route_and_method(server) -> None:
    assert httpx.get(f"{server.url}/v1/nope").json() == {"error": "Not Found"}
    assert httpx.get(f"{server.url}/v1/candidates").status_code == 405


def test_server_keeps_serving_after_bad_input(server) -> None:
    for _ in range(3):
        httpx.post(f"{server.url}/v1/candidates", content=b"\xff\xfe", headers={"content-type": "application/json"})
    r = httpx.post(f"{server.url}/v1/candidates", json=GOOD)
    assert r.status_code == 200 and len(r.json()["candidates"]) == 5

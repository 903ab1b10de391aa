"""Every kind of bad input gets a 4xx with a JSON {"error": ...}, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

GOOD = {"user_id": "3", "k": 5}


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"k": 5}, 400, "give user_id, or query_vector"),
        ({"user_id": "3"}, 422, "k"),
        ({"user_id": "3", "k": 0}, 400, "between 1 and 200"),
        ({"user_id": "3", "k": -4}, 400, "between 1 and 200"),
        ({"user_id": "3", "k": 201}, 400, "between 1 and 200"),
        ({"user_id": True, "k": 5}, 422, "user_id"),
        ({"user_id": 3.5, "k": 5}, 422, "user_id"),
        ({"user_id": "3", "k": "5"}, 422, "k"),
        ({"user_id": "3", "k": 5.5}, 422, "k"),
        ({"user_id": "", "k": 5}, 422, "user_id"),
        ({"user_id": "3", "k": 5, "extra": 1}, 422, "extra"),
        ({"user_id": "3", "k": 5, "filter": {"categories": ["nope"]}}, 400, "unknown category 'nope'"),
        ({"user_id": "3", "k": 5, "filter": {"categories": "cat_0001"}}, 422, "categories"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_candidates_requests(server, body, status, words) -> None:
    r = httpx.post(f"{server.url}/v1/candidates", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"user_id": "3", "item_id": "no-such-item"}, 404, "not in the served catalog"),
        ({"user_id": "3", "item_id": 5.5}, 422, "item_id"),
        ({"user_id": "3"}, 422, "item_id"),
        ({"user_id": "3", "item_id": "5", "ts": -1}, 400, "ts"),
        ({"user_id": "3", "item_id": "5", "type": ""}, 422, "type"),
    ],
)
def test_bad_events(server, body, status, words) -> None:
    r = httpx.post(f"{server.url}/v1/events", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_malformed_json(server) -> None:
    r = httpx.post(
        f"{server.url}/v1/candidates", content=b'{"user_id": "3", "k": ', headers={"content-type": "application/json"}
    )
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
        bad = httpx.post(
            f"{server.url}/v1/candidates", content=b"\xff\xfe", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and "error" in bad.json(), bad.text
    r = httpx.post(f"{server.url}/v1/candidates", json=GOOD)
    assert r.status_code == 200 and len(r.json()["candidates"]) == 5


# ---- a server that takes writes, with the default limits (its own bundle root and delta log) ------

TOKEN = "bad-input-token-9e2f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def writable(bundle_paths, tmp_path_factory):  # type: ignore[no-untyped-def]
    from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
    from towerann.freshness.publish import publish_bundle
    from towerann.server.server import start_background

    tmp = tmp_path_factory.mktemp("writable")
    publish_bundle(tmp / "indexes", bundle_paths["model"], bundle_paths["vectors"], kind="exact")
    (tmp / "token").write_text(TOKEN)
    cfg = Config(
        serve=ServeConfig(max_k=200, max_items_per_write=3),
        paths=PathsConfig(index=str(tmp / "indexes"), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store="embedded", path=str(tmp / "features.sqlite")),
        freshness=FreshnessConfig(
            adopt_log=True, delta_path=str(tmp / "delta.sqlite"), token_file=str(tmp / "token"), poll_s=0.0
        ),
    )
    handle = start_background(cfg)
    yield handle
    handle.stop()


def item_row(bundle_paths, item_id, **changes):  # type: ignore[no-untyped-def]
    from towerann.data.dataset import read_items

    row = read_items(bundle_paths["data"]).iloc[0]
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    return {**out, "item_id": item_id, "available": True, **changes}


def test_a_refused_item_write_is_not_logged(writable, bundle_paths) -> None:  # type: ignore[no-untyped-def]
    """POST /v1/items with price=1e300: the item tower makes NaN of it, so 400, and the delta log is
    untouched (it was logged first before the fix; then no server could start on that log)."""
    delta = writable.service.writer.delta
    before = delta.last_seq()
    r = httpx.post(
        f"{writable.url}/v1/items", json={"items": [item_row(bundle_paths, "880001", price=1e300)]}, headers=AUTH
    )
    assert r.status_code == 400 and "non-finite" in r.json()["error"], r.text
    assert delta.last_seq() == before
    assert httpx.patch(f"{writable.url}/v1/items/880001", json={"available": False}, headers=AUTH).status_code == 404
    assert delta.last_seq() == before


@pytest.mark.parametrize("item_id", ["9223372036854775808", "-9223372036854775809", "1" + "0" * 40])
def test_item_ids_beyond_int64_are_unknown_not_500(writable, bundle_paths, item_id) -> None:  # type: ignore[no-untyped-def]
    url = writable.url
    for body in ({"user_id": "3", "item_id": item_id}, {"user_id": "3", "item_id": int(item_id)}):
        r = httpx.post(f"{url}/v1/events", json=body)
        assert r.status_code == 404 and "not in the served catalog" in r.json()["error"], r.text
    assert httpx.patch(f"{url}/v1/items/{item_id}", json={"available": False}, headers=AUTH).status_code == 404
    assert httpx.delete(f"{url}/v1/items/{item_id}", headers=AUTH).status_code == 404
    r = httpx.post(f"{url}/v1/items", json={"items": [item_row(bundle_paths, item_id)]}, headers=AUTH)
    assert r.status_code == 400 and "64-bit" in r.json()["error"], r.text  # was 500 (OverflowError)


def test_huge_numbers_in_item_features_are_4xx_not_500(writable, bundle_paths) -> None:  # type: ignore[no-untyped-def]
    url = writable.url
    # 10**20 does not fit int64, so numpy made an object of it (500 TypeError before the fix). It is the
    # number 1e20 (JSON has one number type): treated as such, like the float 1e20.
    r = httpx.post(f"{url}/v1/items", json={"items": [item_row(bundle_paths, "880002", price=10**20)]}, headers=AUTH)
    f = httpx.post(f"{url}/v1/items", json={"items": [item_row(bundle_paths, "880003", price=1e20)]}, headers=AUTH)
    assert r.status_code == f.status_code and r.status_code in (200, 400), (r.text, f.text)
    big = b'{"items": [{"item_id": "880004", "category": "cat_0000", "price": 1' + b"0" * 400 + b"}]}"
    r = httpx.post(f"{url}/v1/items", content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "too large" in r.json()["error"], r.text
    nan = b'{"items": [{"item_id": "880005", "category": "cat_0000", "price": NaN}]}'  # Python's JSON reads NaN
    r = httpx.post(f"{url}/v1/items", content=nan, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["error"], r.text


def test_integer_ids_are_accepted_in_the_catalogs_spelling(writable) -> None:  # type: ignore[no-untyped-def]
    url = writable.url
    r = httpx.post(f"{url}/v1/candidates", json={"user_id": 42, "k": 5})
    assert r.status_code == 200 and len(r.json()["candidates"]) == 5, r.text
    e = httpx.post(f"{url}/v1/events", json={"user_id": 42, "item_id": 5})
    assert e.status_code == 200 and (e.json()["user_id"], e.json()["item_id"]) == ("42", "5"), e.text
    assert writable.retriever.store.get_one("42").session[0].item_id == "5"  # the same user as "42"


def test_limits_keep_unauthenticated_traffic_bounded(writable, bundle_paths) -> None:  # type: ignore[no-untyped-def]
    import time

    url, store = writable.url, writable.retriever.store
    before = store.stats()
    long_id = "u" * 60_000  # 1,000 of these grew RSS and features.sqlite before the limit
    for body in ({"user_id": long_id, "item_id": "5"}, {"user_id": "3", "item_id": "5", "type": "t" * 300}):
        r = httpx.post(f"{url}/v1/events", json=body)
        assert r.status_code == 422 and "at most 256 characters" in r.json()["error"], r.text
    assert httpx.post(f"{url}/v1/candidates", json={"user_id": long_id, "k": 5}).status_code == 422
    now = time.time()
    for ts in (1e300, now + 3600, now - 2 * 86400.0):
        r = httpx.post(f"{url}/v1/events", json={"user_id": "ts-user", "item_id": "5", "ts": ts})
        assert r.status_code == 400 and "session window" in r.json()["error"], (ts, r.text)
    assert store.stats()["session_users"] == before["session_users"]
    assert (
        httpx.post(f"{url}/v1/events", json={"user_id": "ts-user", "item_id": "5", "ts": now - 60}).status_code == 200
    )
    rows = [item_row(bundle_paths, str(881000 + i)) for i in range(4)]  # the fixture allows 3 a write
    r = httpx.post(f"{url}/v1/items", json={"items": rows}, headers=AUTH)
    assert r.status_code == 422 and "at most 3" in r.json()["error"], r.text


def test_an_unexpected_error_keeps_the_connection(bundle_paths, caplog) -> None:  # type: ignore[no-untyped-def]
    """A 500 is logged and answered as JSON; the keep-alive connection stays usable (it was reset)."""
    from towerann.config import Config, PathsConfig
    from towerann.features import open_store
    from towerann.server.server import start_background
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.retriever import Retriever

    class Boom(type(open_store("memory"))):  # type: ignore[misc]
        def get_one(self, user_id, now=None):  # type: ignore[no-untyped-def]
            if user_id == "boom":
                raise RuntimeError("a bug")
            return super().get_one(user_id, now)

    retriever = Retriever(BundleHolder(RetrievalBundle.load(bundle_paths["index"])), Boom(None), max_k=50)
    handle = start_background(Config(paths=PathsConfig(index=str(bundle_paths["index"]))), retriever=retriever)
    try:
        with httpx.Client(base_url=handle.url) as http:
            r = http.post("/v1/candidates", json={"user_id": "boom", "k": 5})
            assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
            assert http.post("/v1/candidates", json={"user_id": "3", "k": 5}).status_code == 200  # same connection
            metrics = http.get("/metrics").text
        assert 'towerann_http_requests_total{route="/v1/candidates",status="500"} 1.0' in metrics
        assert any("unexpected error" in rec.getMessage() for rec in caplog.records)
    finally:
        handle.stop()


def test_a_client_gone_mid_body_counts_as_499_not_500(server) -> None:
    import socket
    import time

    host, port = server.url.removeprefix("http://").split(":")
    before = httpx.get(f"{server.url}/metrics").text
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /v1/candidates HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"user_id": '
        )
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while '/v1/candidates",status="499"' not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.05)
    after = httpx.get(f"{server.url}/metrics").text
    assert after.count('status="500"') == before.count('status="500"')


def test_trailing_slash_is_404_without_a_redirect_from_the_host_header(server) -> None:
    r = httpx.post(f"{server.url}/v1/candidates/", json=GOOD, headers={"host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers and r.json() == {"error": "Not Found"}


def test_bearer_scheme_in_any_case_and_nothing_else(writable) -> None:  # type: ignore[no-untyped-def]
    url = writable.url
    for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN}"):
        assert httpx.delete(f"{url}/v1/items/no-such", headers={"Authorization": header}).status_code == 404, header
    for header in (f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", ""):
        assert httpx.delete(f"{url}/v1/items/no-such", headers={"Authorization": header}).status_code == 401, header


def test_openapi_documents_bounds_errors_and_media_types(server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    req = schema["components"]["schemas"]["CandidatesRequest"]["properties"]
    assert (req["k"]["minimum"], req["k"]["maximum"]) == (1, 200)
    assert {"type": "integer"} in req["user_id"]["anyOf"]
    assert {"type": "string", "minLength": 1, "maxLength": 256}.items() <= req["user_id"]["anyOf"][0].items()
    for path, method in (("/v1/items", "post"), ("/v1/items/{item_id}", "patch"), ("/v1/items/{item_id}", "delete")):
        assert {"400", "401", "503"} <= set(schema["paths"][path][method]["responses"]), path
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")


def test_a_lone_surrogate_in_any_string_is_400_naming_the_field(
    writable,  # type: ignore[no-untyped-def]
    bundle_paths,
) -> None:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 store can take: the item write was
    a 500 (UnicodeEncodeError), ids in candidates and events a 422."""
    import json

    url, delta = writable.url, writable.service.writer.delta
    before = delta.last_seq()

    def post(path: str, body: object, headers: dict[str, str] = AUTH) -> httpx.Response:
        # json.dumps escapes the surrogate as \ud800 (httpx's json= would fail to encode it on this side)
        return httpx.post(
            f"{url}{path}", content=json.dumps(body).encode(), headers={**headers, "content-type": "application/json"}
        )

    row = item_row(bundle_paths, "880020")
    for path, body, field in [
        ("/v1/items", {"items": [{**row, "category": "\ud800"}]}, "items[0].category"),
        ("/v1/items", {"items": [{**row, "brand": "b\udfff"}]}, "items[0].brand"),
        ("/v1/items", {"items": [row, {**row, "item_id": "\ud800"}]}, "items[1].item_id"),
        ("/v1/items", {"items": [{**row, "\ud800": 1}]}, "items[0]"),
        ("/v1/candidates", {"user_id": "\ud800", "k": 5}, "user_id"),
        (
            "/v1/candidates",
            {"user_id": "3", "k": 5, "filter": {"categories": ["cat_0001", "\udc00x"]}},
            "filter.categories[1]",
        ),
        ("/v1/events", {"user_id": "\ud800", "item_id": "5"}, "user_id"),
        ("/v1/events", {"user_id": "3", "item_id": "\ud800"}, "item_id"),
        ("/v1/events", {"user_id": "3", "item_id": "5", "type": "\ud800"}, "type"),
        ("/v1/candidates", {"user_id": "3", "k": 5, "\ud800": 1}, "body"),
    ]:
        r = post(path, body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"].startswith(field + ": ") and "UTF-8" in r.json()["error"], r.text
    r = httpx.patch(
        f"{url}/v1/items/5",
        content=b'{"available": false, "\\udfff": 1}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"].startswith("body: a field name"), r.text
    for depth in (900, 5000):  # the check walks nested values without recursion
        deep = b'{"user_id": "3", "k": 5, "filter": {"categories": ' + b"[" * depth + b"]" * depth + b"}}"
        r = httpx.post(f"{url}/v1/candidates", content=deep, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text
    assert post("/v1/items", {"items": [{**row, "category": "\ud800"}]}, headers={}).status_code == 401
    assert delta.last_seq() == before and httpx.delete(f"{url}/v1/items/880020", headers=AUTH).status_code == 404
    assert post("/v1/items", {"items": [{**row, "category": "cat \U0001f600"}]}).status_code == 200  # a pair is fine
    assert httpx.post(f"{url}/v1/candidates", json=GOOD).status_code == 200
    assert 'status="500"' not in httpx.get(f"{url}/metrics").text


def test_an_item_vector_of_near_zero_norm_is_refused_naming_the_far_features(
    writable,  # type: ignore[no-untyped-def]
    bundle_paths,
) -> None:
    """price 1e38 or quality -1e30 are finite, but the item tower maps them to the zero vector, which was
    accepted and then ranked above real items. The model's feature schema holds the training statistics."""
    url, delta = writable.url, writable.service.writer.delta
    before = delta.last_seq()
    for changes, far, near in [
        ({"price": 1e38, "quality": -1e30}, ["price=1e+38", "quality=-1e+30"], []),
        ({"price": 1e38}, ["price=1e+38"], ["quality"]),
        ({"quality": -1e30}, ["quality=-1e+30"], ["price"]),
    ]:
        r = httpx.post(f"{url}/v1/items", json={"items": [item_row(bundle_paths, "880030", **changes)]}, headers=AUTH)
        assert r.status_code == 400, (changes, r.text)
        error = r.json()["error"]
        assert "'880030'" in error and "zero norm" in error and "nothing was written" in error, error
        assert all(f in error for f in far) and not any(n in error for n in near), error
    assert delta.last_seq() == before
    assert httpx.delete(f"{url}/v1/items/880030", headers=AUTH).status_code == 404
    ok = httpx.post(f"{url}/v1/items", json={"items": [item_row(bundle_paths, "880031", price=1e6)]}, headers=AUTH)
    assert ok.status_code == 200, ok.text  # far out but still a unit vector: taken, as before

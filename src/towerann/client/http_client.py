"""The HTTP client of a running `towerann serve`: candidates, click events, item writes, reloads.

    from towerann.client import Client

    with Client("http://127.0.0.1:8000", token="...") as c:   # token: only the write routes need it
        got = c.candidates("42", k=100, categories=["cat_0001"])
        got = c.candidates("42", k=100, filter={"categories": ["cat_0001"], "brand": ["acme"]})
        got.item_ids, got.scores, got.degraded
        c.event("42", "1234")                                # the next candidates count this click
        c.upsert_items([{"item_id": "900001", "category": "cat_0001", ...}])

One pooled keep-alive connection set (httpx), a timeout per call, and retries with exponential
backoff where they are safe: on 503 and 429 (the server answers those before it has written
anything) and on a connection that could not be opened (nothing was sent); a read that timed out
is retried only for calls that can be repeated without effect (not clicks, which would count
twice). Errors are the exceptions the Python API raises (towerann.errors), with the server's
one-line message; the token and any credentials in the URL never appear in them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from towerann.errors import (
    ArtifactError,
    BackendUnavailable,
    BadRequest,
    Forbidden,
    NotFound,
    TowerannError,
    Unauthorized,
)
from towerann.storeurl import redact

RETRY_STATUSES = (429, 503)
ERRORS_BY_STATUS: dict[int, type[TowerannError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: ArtifactError,
    413: BadRequest,
    422: BadRequest,
}


@dataclass(frozen=True)
class Candidates:
    """The answer of POST /v1/candidates (item ids as the catalog has them: ints for integer catalogs)."""

    item_ids: list[int | str]
    scores: list[float]
    model_version: str
    index_version: str
    timings_ms: dict[str, float]
    degraded: bool  # the server's feature store did not answer: ranked without the user's features
    missing_shards: list[int] = field(default_factory=list)  # a sharded index: shards left out (deadline)

    @property
    def partial(self) -> bool:
        """Some shards of a sharded index missed the deadline: these are the best of the others' items."""
        return bool(self.missing_shards)


def filter_body(
    categories: Sequence[str] | None, filter: Mapping[str, Sequence[str | bool] | None] | None
) -> dict[str, Any] | None:
    """The request's "filter" object from candidates()' arguments (None: no filter). Value lists go as
    JSON lists (a tuple or set too); a single string is sent as it is, so the server says it wants a list."""
    if filter is not None and not isinstance(filter, Mapping):
        raise BadRequest(
            f"filter must be a dict of key -> list of values, e.g. {{'categories': ['cat_0001']}}, "
            f"got a {type(filter).__name__}"
        )
    out = {key: _values(v) for key, v in (filter or {}).items()}
    if categories is not None:
        if out.get("categories") is not None:
            raise BadRequest("categories given twice: pass them as categories=[...] or in filter, not both")
        out["categories"] = _values(categories)
    return out or None


def _values(values: Any) -> Any:
    if values is None or isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return values
    return list(values)


class Client:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        max_connections: int = 16,
    ):
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("retries >= 0, timeout_s > 0 and backoff_s >= 0 are required")
        self.url = url.rstrip("/")
        self._shown_url = redact(self.url)
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    # ---- reads --------------------------------------------------------------------------------------

    def candidates(
        self,
        user_id: str | int | None = None,
        k: int = 100,
        categories: Sequence[str] | None = None,
        *,
        query_vector: Sequence[float] | None = None,
        filter: Mapping[str, Sequence[str | bool] | None] | None = None,
    ) -> Candidates:
        """Top-k items for this user now (their clicks up to this call counted).
        `filter`: {"categories": [names], <attribute>: [values], ...} keeps items that match every key
        given, each key by any of its values; the attributes are the served bundle's [filters] attributes
        (strings or booleans). `categories=[...]` is short for filter={"categories": [...]}.
        `query_vector` instead of `user_id`: the top-k for a user-tower output made by the caller."""
        body: dict[str, Any] = {"k": k}
        if user_id is not None:
            body["user_id"] = user_id
        if query_vector is not None:
            body["query_vector"] = [float(x) for x in query_vector]
            bad = [i for i, x in enumerate(body["query_vector"]) if not math.isfinite(x)]
            if bad:  # JSON has no NaN: the server's own answer to it, without a request
                raise BadRequest(f"query_vector holds a NaN or infinite value at position {bad[0]}")
        flt = filter_body(categories, filter)
        if flt is not None:
            body["filter"] = flt
        got = self._call("POST", "/v1/candidates", body, repeatable=True)
        return Candidates(
            item_ids=[c["item_id"] for c in got["candidates"]],
            scores=[float(c["score"]) for c in got["candidates"]],
            model_version=got["model_version"],
            index_version=got["index_version"],
            timings_ms=got["timings_ms"],
            degraded=bool(got["degraded"]),
            missing_shards=[int(s) for s in got.get("missing_shards") or []],
        )

    def ready(self) -> dict[str, Any]:
        """GET /readyz: the served versions and each dependency's state (BackendUnavailable while not ready)."""
        return self._call("GET", "/readyz", None, repeatable=True)

    # ---- writes -------------------------------------------------------------------------------------

    def event(
        self, user_id: str | int, item_id: str | int, type: str = "click", ts: float | None = None
    ) -> dict[str, Any]:
        """Record a session event; stored before the reply. Not retried after a read timeout (it could count twice)."""
        body: dict[str, Any] = {"user_id": user_id, "item_id": item_id, "type": type}
        if ts is not None:
            body["ts"] = ts
        return self._call("POST", "/v1/events", body, repeatable=False)

    def upsert_items(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Add or replace items (embedded by the served item tower); searchable when this returns."""
        return self._call("POST", "/v1/items", {"items": items}, repeatable=True)

    def set_available(self, item_id: str | int, available: bool) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/items/{item_id}", {"available": available}, repeatable=True)

    def delete_item(self, item_id: str | int) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/items/{item_id}", None, repeatable=False)  # a repeat would get 404

    def reload(self) -> dict[str, Any]:
        """Load the bundle CURRENT names now; ArtifactError (409) if the server refused it."""
        return self._call("POST", "/v1/admin/reload", None, repeatable=True)

    # ---- plumbing -----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any, repeatable: bool) -> Any:
        where = f"{method} {self._shown_url}{path}"
        for attempt in range(self.retries + 1):
            last, response = attempt == self.retries, None
            try:
                response = self._http.request(method, path, json=body)
            except httpx.ConnectError as e:  # nothing was sent: always safe to try again
                if last:
                    raise BackendUnavailable(f"{where}: cannot connect ({type(e).__name__})") from None
            except httpx.TimeoutException as e:
                if last or not repeatable:
                    raise BackendUnavailable(f"{where}: no answer in time ({type(e).__name__})") from None
            except httpx.TransportError as e:
                raise BackendUnavailable(f"{where}: {type(e).__name__}") from None
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUSES or last:
                    raise self._error(method, path, response)
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Exponential backoff with jitter; a server's Retry-After (seconds) is honoured up to 5 s."""
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), 5.0)
        return self.backoff_s * (2**attempt) * (0.5 + random.random())

    def _error(self, method: str, path: str, r: httpx.Response) -> TowerannError:
        try:
            message = str(r.json().get("error", r.text))
        except ValueError:
            message = r.text[:200]
        cls = ERRORS_BY_STATUS.get(
            r.status_code, BackendUnavailable if r.status_code in RETRY_STATUSES else TowerannError
        )
        return cls(f"{method} {path} -> {r.status_code}: {message}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

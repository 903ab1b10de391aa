"""The HTTP API: a thin FastAPI shell around the Retriever (no logic the Python API lacks).

    POST /v1/candidates {user_id, k, filter?} -> {candidates: [{item_id, score}], model_version, index_version, timings_ms}
    POST /v1/events     {user_id, item_id, type, ts?} -> stored before the response returns
    GET  /healthz  /readyz (503 until a bundle is loaded)  /metrics (Prometheus text)
    POST /v1/items, PATCH|DELETE /v1/items/{id}, POST /v1/admin/reload (bearer token; freshness/)

Every bad input gets a 4xx with {"error": message}; an unexpected exception a logged 500 JSON, and
the server keeps serving. Request handlers are `async def`: they run one at a time on the event loop,
which (1) serialises searches with live index writes (POST/PATCH/DELETE /v1/items) without a lock on
the read path, and (2) measured at 1M items, K=1000 (`towerann bench serve`), kept p99 at 4.2 ms at
200 req/s and 5.4 ms at 400 req/s together with the frozen heap (service.server.freeze_heap). An
earlier measurement at 100k items, K=100, before the heap was frozen, favoured the thread pool at
1200 req/s (faiss and ONNX Runtime release the GIL, so two requests can overlap on two cores);
re-measure before changing this.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, Callable, Protocol

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from towerann.errors import Forbidden, NotFound, TowerannError, Unauthorized
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.retriever import STAGES, Retriever

log = logging.getLogger(__name__)

ROUTES = ("/v1/candidates", "/v1/events", "/v1/items", "/v1/admin/reload", "/healthz", "/readyz", "/metrics")
BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# ---- schema (OpenAPI) -------------------------------------------------------------------------------

class CandidateFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    categories: list[str] | None = Field(None, description="keep only items of these category names")


class CandidatesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1)
    k: int = Field(description="number of candidates, 1..max_k")
    filter: CandidateFilter | None = None


class Candidate(BaseModel):
    item_id: int | str
    score: float


class CandidatesResponse(BaseModel):
    candidates: list[Candidate]
    model_version: str
    index_version: str
    timings_ms: dict[str, float]


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1, description="the catalog's item id, as a string")
    type: str = Field("click", min_length=1)
    ts: float | None = Field(None, description="unix seconds; omitted = now")


class EventResponse(BaseModel):
    user_id: str
    item_id: str
    type: str
    ts: float


class ItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[dict[str, Any]] = Field(description="item rows: item_id (string), category, available?, and "
                                                    "the item tower's feature columns", min_length=1)


class AvailabilityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    available: bool


class ErrorResponse(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 503)}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 422)}


# ---- what the write routes call (freshness/ implements them; serving never imports it) -------------

class ItemWrites(Protocol):
    def upsert(self, rows: Any) -> dict[str, Any]: ...
    def set_available(self, item_id: str, available: bool) -> dict[str, Any]: ...
    def delete(self, item_id: str) -> dict[str, Any]: ...


class BundleReloads(Protocol):
    def reload(self) -> dict[str, Any]: ...
    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None: ...


# ---- metrics ----------------------------------------------------------------------------------------

class Metrics:
    """Per-app registry, so two apps in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("towerann_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.stage = Histogram("towerann_stage_seconds", "server-side time per request stage",
                               ["stage"], buckets=BUCKETS_S, registry=self.registry)
        self.stage_children = {s: self.stage.labels(stage=s) for s in STAGES}
        self.index_items = Gauge("towerann_index_items", "live items in the served index", registry=self.registry)
        self.bundle = Info("towerann_bundle", "the served retrieval bundle", registry=self.registry)
        self.reloads = Counter("towerann_bundle_reloads", "bundle reloads by outcome (swapped, refused)",
                               ["outcome"], registry=self.registry)

    def on_swap(self, bundle: RetrievalBundle) -> None:
        self.index_items.set(len(bundle.index))
        self.bundle.info({"index_version": bundle.version, "model_version": bundle.model_version,
                          "index": bundle.index.describe()})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class GuardMiddleware:
    """Pure ASGI: refuse oversized bodies (declared or actual) with 413, count requests by route/status."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/v1/items/{item_id}" if path.startswith("/v1/items/") else "other"
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                declared = dict(scope["headers"]).get(b"content-length")
                if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                    return await self._too_large(scope, receive, send_counted)
                body, more = bytearray(), True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await self._too_large(scope, receive, send_counted)
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await _error(413, f"request body over {self.max_body} bytes; send a smaller body "
                          "(raise [serve] max_body_bytes if this was intended)")(scope, receive, send)


def create_app(retriever: Retriever, max_body_bytes: int = 65536, writer: ItemWrites | None = None,
               reloader: BundleReloads | None = None, token: str | None = None) -> FastAPI:
    """The HTTP app around one Retriever; its holder may be empty (readyz says 503) until a swap.

    writer (freshness.live.ItemWriter) and reloader (freshness.reload.Reloader) enable the item and
    admin endpoints; they need `Authorization: Bearer <token>`."""
    metrics = Metrics()
    if reloader is not None:
        reloader.add_listener(lambda outcome, info: metrics.reloads.labels(outcome=outcome).inc())
    holder = retriever.holder
    holder.subscribe(metrics.on_swap)
    app = FastAPI(title="towerann", summary="two-tower retrieval: top-K candidates for a user, now",
                  responses={})
    app.state.retriever, app.state.metrics = retriever, metrics
    observe = metrics.stage_children

    # The request handlers are `async` on purpose: they run on the event loop, one at a time. A
    # request is ~1-2 ms of CPU, mostly under the GIL; in uvicorn's thread pool, concurrent
    # requests fought over the GIL and the p99 at 200 requests/s grew ten-fold.
    @app.post("/v1/candidates", response_model=None, responses={200: {"model": CandidatesResponse}, **ERRORS})
    async def candidates(req: CandidatesRequest) -> Response:
        c = retriever.candidates(req.user_id, req.k, None if req.filter is None else req.filter.model_dump())
        for stage, ms in c.timings_ms.items():
            observe[stage].observe(ms / 1e3)
        body = {"candidates": [{"item_id": i, "score": s} for i, s in zip(c.item_ids, c.scores)],
                "model_version": c.model_version, "index_version": c.index_version, "timings_ms": c.timings_ms}
        # orjson: at k=1000, json.dumps costs ~0.8 ms a request, as much as the retrieval itself
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/v1/events", response_model=EventResponse, responses=ERRORS)
    async def events(req: EventRequest) -> dict[str, Any]:
        e = retriever.record_event(req.user_id, req.item_id, req.type, req.ts)
        return {"user_id": e.user_id, "item_id": e.item_id, "type": e.type, "ts": e.ts}

    async def authorize(request: Request) -> None:
        """A dependency of every write route: FastAPI runs it before it validates the body, so a
        request without the token gets 401 whatever it carries. (async: no thread-pool hop.)"""
        if writer is None:
            raise NotFound("item writes are not enabled on this server")
        if token is None:
            raise Forbidden("writes are disabled: no API token is configured (set TOWERANN_API_TOKEN or "
                            "[freshness] token_file)")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")

    writes = {"responses": WRITE_ERRORS, "dependencies": [Depends(authorize)]}

    @app.post("/v1/items", **writes)
    async def upsert_items(req: ItemsRequest) -> dict[str, Any]:
        """Embed the items with the item tower and add them to the live index: searchable on return."""
        return writer.upsert(req.items)

    @app.patch("/v1/items/{item_id}", **writes)
    async def set_available(item_id: str, req: AvailabilityRequest) -> dict[str, Any]:
        return writer.set_available(item_id, req.available)

    @app.delete("/v1/items/{item_id}", **writes)
    async def delete_item(item_id: str) -> dict[str, Any]:
        return writer.delete(item_id)

    @app.post("/v1/admin/reload", **writes)
    async def reload() -> JSONResponse:
        """Load the bundle CURRENT names now (validated; refused if bad, the old one keeps serving)."""
        if reloader is None:
            raise NotFound("this server does not serve a bundle root with CURRENT; nothing to reload")
        info = await asyncio.to_thread(reloader.reload)  # off the loop: requests keep being answered
        return JSONResponse(info, status_code=409 if info["outcome"] == "refused" else 200)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    def readyz() -> Response:
        if not holder.ready:
            return _error(503, "no retrieval bundle loaded yet")
        return JSONResponse({"status": "ready", **holder.current().describe()})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(TowerannError)
    async def towerann_error(request: Request, exc: TowerannError) -> JSONResponse:
        return _error(exc.http_status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error(400, "request body is not valid JSON")
        if any(tuple(e.get("loc", ())) == ("body",) for e in errs):
            return _error(400, "request body must be a JSON object, sent with Content-Type: application/json")
        parts = []
        for e in errs[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes, metrics=metrics)
    return app

"""The HTTP API: a thin FastAPI shell around the Retriever (no logic the Python API lacks).

    POST /v1/candidates {user_id | query_vector, k, filter?} -> {candidates: [{item_id, score}], model_version,
                        index_version, timings_ms, degraded, partial?, missing_shards?}   (query_vector: a
                        user-tower output made by the caller; partial: a sharded index left shards out)
    POST /v1/events     {user_id, item_id, type, ts?} -> stored before the response returns (503 if it cannot be)
    GET  /healthz (always at once: touches nothing)  /readyz  /metrics (Prometheus text)
    POST /v1/items, PATCH|DELETE /v1/items/{id}, POST /v1/admin/reload (bearer token; freshness/; an item row
                        carries features for the item tower, or its `vector` on a vectors-only bundle)
    GET  /v1/admin/recall (bearer token): the online recall monitor's recall@k per bundle and filter kind

Ids (user_id, item_id) are strings or JSON integers (spelled in decimal, as the catalog prints them).

The transport-independent part of candidates, events, readiness and reload (the request model's checks
and limits, the Retriever call, metrics, access-log notes, degraded / partial, the bearer token) is
`ApiCore`: these routes and the gRPC service of `serve --grpc-port` (server.grpc_service) both call it.

Every bad input gets a 4xx with {"error": message}; an unexpected exception a logged 500 JSON, and
the server keeps serving (on the same keep-alive connection). When the feature store (Redis) is down
or slower than [features] timeout_ms, candidates are answered without the user's features, with
`degraded: true`; a click or an item write that cannot be stored gets 503. /readyz answers 200 while
a bundle is loaded, even with a dependency down ("degraded": true, "dependencies": {"features":
"down"}): candidates are still served, and a shared Redis going down must not take every replica
out of its load balancer at once; it answers 503 only until a bundle is loaded.

Request handlers are `async def`: they run one at a time on the event loop,
which (1) serialises searches with live index writes (POST/PATCH/DELETE /v1/items) without a lock on
the read path, and (2) measured at 1M items, K=1000 (`towerann bench serve`), kept p99 at 4.2 ms at
200 req/s and 5.4 ms at 400 req/s together with the frozen heap (server.asgi.freeze_heap). An
earlier measurement at 100k items, K=100, before the heap was frozen, favoured the thread pool at
1200 req/s (faiss and ONNX Runtime release the GIL, so two requests can overlap on two cores);
re-measure before changing this.
"""

# No `from __future__ import annotations` here: the request models are built per app (their limits come
# from the config), and FastAPI must see the handlers' annotations as those classes, not as strings.

import asyncio
import concurrent.futures
import functools
import hmac
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import orjson
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from towerann.errors import (
    BackendUnavailable,
    BadRequest,
    Forbidden,
    NotFound,
    ShardsUnavailable,
    TowerannError,
    Unauthorized,
)
from towerann.serving import access
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.monitor import RecallMonitor
from towerann.serving.process_metrics import ServerProcesses
from towerann.serving.retriever import STAGES, Candidates, Retriever, int64_spelling_in_range

log = logging.getLogger(__name__)

ROUTES = (
    "/v1/candidates",
    "/v1/events",
    "/v1/items",
    "/v1/admin/reload",
    "/v1/admin/recall",
    "/healthz",
    "/readyz",
    "/metrics",
)
BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RECALL_BUCKETS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


# ---- schema (OpenAPI) -------------------------------------------------------------------------------


class Candidate(BaseModel):
    item_id: int | str
    score: float


class CandidatesResponse(BaseModel):
    candidates: list[Candidate]
    model_version: str
    index_version: str
    timings_ms: dict[str, float]
    degraded: bool = Field(
        description="true: the feature store did not answer in time, so these candidates "
        "were ranked without the user's features and session (cold start)"
    )
    partial: bool | None = Field(
        None,
        description="only when true: a sharded index answered without some "
        "shards (late or restarting); the candidates are the best of the other shards' items",
    )
    missing_shards: list[int] | None = Field(None, description="with partial: the shards left out")


class EventResponse(BaseModel):
    user_id: str
    item_id: str
    type: str
    ts: float


NOT_UTF8 = "cannot be encoded as UTF-8 (a lone surrogate such as \\ud800); send valid Unicode text"


def _encodes(text: str) -> bool:
    if text.isascii():  # O(1): nearly every string
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def unencodable(value: Any) -> tuple[str, str] | None:
    """(where, what) of a string in parsed JSON that UTF-8 cannot encode, else None. JSON's \\u escapes can
    spell a lone surrogate; a store, a log or a response that encodes it would fail (a 500)."""
    try:  # the common case at C speed (a walk in Python cost 26 us for a 256-float query_vector, this 6)
        orjson.dumps(value)
        return None
    except orjson.JSONEncodeError:  # a lone surrogate, or only an integer beyond 64 bits, or deep nesting
        pass
    stack = [(value, "")]  # no recursion: a deeply nested body must not overflow the stack
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if not _encodes(v):
                return where or "body", "a string that"
        elif isinstance(v, dict):
            for key, x in v.items():
                if not _encodes(key):
                    return where or "body", "a field name that"
                if isinstance(x, (str, dict, list)):
                    stack.append((x, f"{where}.{key}" if where else key))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]") for i, x in enumerate(v) if isinstance(x, (str, dict, list)))
    return None


class RequestBody(BaseModel):
    """Every request body: a string UTF-8 cannot encode, anywhere in it, is a 400 naming its field."""

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        found = unencodable(data)
        if found is not None:
            raise PydanticCustomError("not_utf8", "{where}: {what} " + NOT_UTF8, {"where": found[0], "what": found[1]})
        return data


class AvailabilityRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", strict=True)
    available: bool


class ErrorResponse(BaseModel):
    error: str


def _integral(value: Any) -> Any:
    """A JSON number with no fraction is an integer (JSON Schema says so: 29.0 is a valid "integer")."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]


def request_models(max_k: int = 1000, max_id_length: int = 256, max_items: int = 1000) -> SimpleNamespace:
    """The request bodies, with this deployment's limits in the schema (OpenAPI shows them)."""
    Id = Annotated[str, StringConstraints(min_length=1, max_length=max_id_length)]
    id_doc = f"a string of 1..{max_id_length} characters, or an integer (taken in its decimal spelling)"

    class CandidateFilter(BaseModel):
        # Other keys are the bundle's [filters] attributes, each a list of values (strings or booleans);
        # an item must match every key given (AND), any value of a key's list (OR). The Retriever checks them.
        model_config = ConfigDict(extra="allow", strict=True)
        __pydantic_extra__: dict[str, list[Id | bool] | None] = Field(init=False)
        categories: list[Id] | None = Field(None, description="keep only items of these category names")

    class CandidatesRequest(RequestBody):
        model_config = ConfigDict(extra="forbid", strict=True)
        user_id: Id | JsonInt | None = Field(None, description=id_doc + "; or give query_vector instead")
        query_vector: list[float] | None = Field(
            None,
            description="instead of user_id: a user-tower output made "
            "by the caller (the served index's dim, finite numbers)",
        )
        # The bounds are checked by the Retriever (400 with what to send), and documented here.
        k: JsonInt = Field(
            description=f"number of candidates, 1..{max_k}", json_schema_extra={"minimum": 1, "maximum": max_k}
        )
        filter: CandidateFilter | None = None

    class EventRequest(RequestBody):
        model_config = ConfigDict(extra="forbid", strict=True)
        user_id: Id | JsonInt = Field(description=id_doc)
        item_id: Id | JsonInt = Field(description="the catalog's item id: " + id_doc)
        type: Id = "click"
        ts: float | None = Field(
            None,
            description="unix seconds, within the session window ([features] ttl_s) "
            "and at most [serve] max_clock_skew_s ahead; omitted = now",
        )

    class ItemsRequest(RequestBody):
        model_config = ConfigDict(extra="forbid", strict=True)
        items: list[dict[str, Any]] = Field(
            description="item rows: item_id (string or integer), category, available?, filter attributes?, "
            "and the item tower's feature columns; on a vectors-only bundle (no item tower) `vector` instead "
            "(the served index's dim, finite numbers)",
            min_length=1,
            max_length=max_items,
        )

    return SimpleNamespace(
        CandidateFilter=CandidateFilter,
        CandidatesRequest=CandidatesRequest,
        EventRequest=EventRequest,
        ItemsRequest=ItemsRequest,
        ItemId=Id,
    )


_defaults = request_models()  # for Python callers and tests; each app builds its own with its limits
CandidateFilter, CandidatesRequest = _defaults.CandidateFilter, _defaults.CandidatesRequest
EventRequest, ItemsRequest = _defaults.EventRequest, _defaults.ItemsRequest


# What the handlers read of the request bodies, for the type checker. FastAPI gets each app's own models
# (request_models: the limits are in their schema), so these names are bound to those at run time.
class CandidatesBody(Protocol):
    user_id: str | int | None
    query_vector: list[float] | None
    k: int
    filter: BaseModel | None


class EventBody(Protocol):
    user_id: str | int
    item_id: str | int
    type: str
    ts: float | None


class ItemsBody(Protocol):
    items: list[dict[str, Any]]


_JSON_ERROR = {"model": ErrorResponse}
ERRORS: dict[int | str, dict[str, Any]] = {code: _JSON_ERROR for code in (400, 404, 413, 422, 503)}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {code: _JSON_ERROR for code in (400, 401, 403, 404, 413, 422, 503)}


def entry_rows(rows: list[dict[str, Any]], bundle: RetrievalBundle, retriever: Retriever) -> list[dict[str, Any]]:
    """Item rows as they come in over HTTP, made safe for the checks underneath (freshness.live.check_rows):
    an integer item_id becomes its decimal string; an item_id outside int64 on a catalog of integer ids,
    and a number too large for a float, are refused here (400) instead of failing deep in numpy."""
    int_ids = bundle.external_ids.dtype.kind in "iu"
    out = []
    for i, row in enumerate(rows):
        clean: dict[str, Any] = {}
        for key, value in row.items():
            where = f"items[{i}].{key}"
            if key == "item_id" and isinstance(value, (str, int)) and not isinstance(value, bool):
                value = retriever.check_id(value, where)
                if int_ids and not int64_spelling_in_range(value.strip()):
                    raise BadRequest(f"{where}: {value!r} is outside the 64-bit integer range of this catalog's ids")
            elif key == "category" and isinstance(value, str):
                value = retriever.check_id(value, where)
            elif isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = float(value)  # what the feature check does anyway, before numpy sees a huge int
                except OverflowError:
                    raise BadRequest(f"{where}: a number too large for a 64-bit float") from None
            elif isinstance(value, float) and not math.isfinite(value):
                raise BadRequest(f"{where}: a finite number is required")
            clean[key] = value
        out.append(clean)
    return out


# ---- what the write routes call (freshness/ implements them; serving never imports it) -------------

# apply_on: a write hands its last step - the change of the served index, no IO - to this runner (which drops
# the change's result, if it has one).
ApplyOn = Callable[[Callable[[], object]], None]


class ItemWrites(Protocol):
    def upsert(self, rows: Any, apply_on: ApplyOn = ...) -> dict[str, Any]: ...
    def set_available(self, item_id: str, available: bool, apply_on: ApplyOn = ...) -> dict[str, Any]: ...
    def delete(self, item_id: str, apply_on: ApplyOn = ...) -> dict[str, Any]: ...


class BundleReloads(Protocol):
    def reload(self, reason: str = ...) -> dict[str, Any]: ...
    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None: ...


# ---- metrics ----------------------------------------------------------------------------------------


class Metrics:
    """Per-app registry, so two apps in one process (tests) never share counters.

    With `multiprocess_dir` (the workers of `towerann serve --workers N`; prometheus_client was
    imported with PROMETHEUS_MULTIPROC_DIR set to it), every worker's counters and histograms live in
    files there and `exposition()` answers the totals of all workers, whichever one is asked; the
    bundle info stays per worker (it names the bundle this worker serves).

    Process metrics (serving.process_metrics): this process's, or with several workers every process
    of the server's (`processes()`: {"parent": pid, "0": pid, ...}), labelled by worker."""

    def __init__(
        self, multiprocess_dir: str | None = None, processes: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "towerann_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        # `serve --grpc-port`: the same calls over gRPC (server.grpc_service), by method and status code name
        self.grpc_requests = Counter(
            "towerann_grpc_requests",
            "gRPC calls by method and status code (OK, INVALID_ARGUMENT, UNAVAILABLE, ...)",
            ["method", "code"],
            registry=self.registry,
        )
        self.stage = Histogram(
            "towerann_stage_seconds",
            "server-side time per request stage",
            ["stage"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.stage_children = {s: self.stage.labels(stage=s) for s in STAGES}
        # livemax: with several workers, the largest index among the live ones (they converge on one)
        self.index_items = Gauge(
            "towerann_index_items",
            "live items in the served index",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            "towerann_bundle_reloads",
            "bundle reloads by outcome (swapped, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.degraded = Counter(
            "towerann_degraded_answers",
            "candidates answered without the user's features (the feature store was down or missed its deadline)",
            registry=self.registry,
        )
        self.partial = Counter(
            "towerann_partial_answers",
            "candidates answered without some shards of a sharded index (late or restarting)",
            registry=self.registry,
        )
        # the online recall monitor (serving.monitor); livemin: with several workers, the worst one
        self.recall = Gauge(
            "towerann_recall",
            "recall@k vs exact search of sampled live requests (mean of the last samples)",
            ["bundle", "filter"],
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.recall_samples = Histogram(
            "towerann_recall_sample",
            "recall@k vs exact search, one per sampled request",
            ["bundle", "filter"],
            buckets=RECALL_BUCKETS,
            registry=self.registry,
        )
        self.recall_dropped = Counter(
            "towerann_recall_samples_dropped",
            "sampled requests not scored (queue_full: "
            "its queue was full; busy: within its duty cycle, [monitor] max_busy; stale: "
            "their bundle was swapped out)",
            ["reason"],
            registry=self.registry,
        )
        self._exposed = [self.registry]
        info_registry = self.registry
        if multiprocess_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            totals, info_registry = CollectorRegistry(), CollectorRegistry()
            # prometheus_client leaves this constructor unannotated
            MultiProcessCollector(totals, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self._exposed = [totals, info_registry]
            mine = os.getpid()
            info_registry.register(ServerProcesses(processes or (lambda: {"self": mine})))
        else:
            ProcessCollector(registry=self.registry)
        self.bundle = Info("towerann_bundle", "the served retrieval bundle", registry=info_registry)

    def exposition(self) -> bytes:
        return b"".join(generate_latest(r) for r in self._exposed)

    def watch(self, monitor: RecallMonitor) -> None:
        """Export what the recall monitor measures (its thread calls these; prometheus_client is thread-safe)."""

        def sample(version: str, kind: str, recall: float, mean: float) -> None:
            self.recall.labels(bundle=version, filter=kind).set(mean)
            self.recall_samples.labels(bundle=version, filter=kind).observe(recall)

        def forget(version: str, kind: str) -> None:  # a bundle long swapped out: no label per version forever
            for metric in (self.recall, self.recall_samples):
                try:
                    metric.remove(version, kind)
                except KeyError:
                    pass

        monitor.listen(sample, lambda reason: self.recall_dropped.labels(reason=reason).inc(), forget)

    def on_swap(self, bundle: RetrievalBundle) -> None:
        self.index_items.set(len(bundle.index))
        self.bundle.info(
            {"index_version": bundle.version, "model_version": bundle.model_version, "index": bundle.index.describe()}
        )


def body_too_large(max_body_bytes: int) -> str:
    """The 413 of a request body over [serve] max_body_bytes (gRPC: RESOURCE_EXHAUSTED, the same words)."""
    return (
        f"request body over {max_body_bytes} bytes; send a smaller body "
        "(raise [serve] max_body_bytes if this was intended)"
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class GuardMiddleware:
    """Pure ASGI: refuse oversized bodies (declared or actual) with 413, count requests by route/status,
    and answer an unexpected exception with a logged 500 JSON without letting it reach the server (which
    would drop the keep-alive connection). A client that goes away before its answer counts as 499.

    `direct` answers a POST /v1/candidates JSON body without FastAPI's routing, dependency and
    validation layers (direct_candidates), or returns None and the app answers it as routed."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        metrics: Metrics,
        worker: str | None = None,
        direct: Callable[[bytes], Awaitable[Response | None]] | None = None,
    ):
        self.app, self.max_body, self.metrics, self.direct = app, max_body_bytes, metrics, direct
        # which worker answered (`serve --workers N`): clients and tests can tell them apart
        self.worker_header = None if worker is None else (b"x-towerann-worker", worker.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "/v1/items/{item_id}" if path.startswith("/v1/items/") else "other"
        status = [0]  # 0: no answer started (yet)
        logged = access.access_log.isEnabledFor(logging.INFO)  # off: nothing more is done for the access log
        if logged:
            t0 = time.perf_counter()
            fields, token = access.start()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.worker_header is not None:
                    message = {**message, "headers": [*message.get("headers", ()), self.worker_header]}
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                headers = dict(scope["headers"])
                declared = headers.get(b"content-length")
                if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                    return await self._too_large(scope, receive, send_counted)
                body, more = bytearray(), True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # gone mid-body: counted as 499 below
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await self._too_large(scope, receive, send_counted)
                if (
                    self.direct is not None
                    and path == "/v1/candidates"
                    and scope["method"] == "POST"
                    and headers.get(b"content-type") == b"application/json"
                ):
                    answer = await self.direct(bytes(body))
                    if answer is not None:
                        return await answer(scope, receive, send_counted)
                replayed = False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope.get("method"), path)
            if status[0] == 0:  # nothing sent yet: answer it, and the connection stays usable
                await _error(500, f"internal error ({type(exc).__name__}); see the server log")(
                    scope, receive, send_counted
                )
        finally:
            # 499 (nginx's "client closed request"): the client went away before any answer started
            self.metrics.requests.labels(route=route, status=str(status[0] or 499)).inc()
            if logged:  # the answer is out: the line costs the client nothing
                access.finish(token, scope["method"], route, status[0] or 499, time.perf_counter() - t0, fields)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, body_too_large(self.max_body))(scope, receive, send)


def create_app(
    retriever: Retriever,
    max_body_bytes: int = 65536,
    writer: ItemWrites | None = None,
    reloader: BundleReloads | None = None,
    token: str | None = None,
    max_items_per_write: int = 1000,
    worker: str | None = None,
    metrics_dir: str | None = None,
    freshen: Callable[[], Awaitable[None]] | None = None,
    processes: Callable[[], dict[str, int]] | None = None,
) -> FastAPI:
    """The HTTP app around one Retriever; its holder may be empty (readyz says 503) until a swap.

    writer (freshness.live.ItemWriter) and reloader (freshness.reload.Reloader) enable the item and
    admin endpoints; they need `Authorization: Bearer <token>`. `worker` names this process in an
    X-Towerann-Worker header; `metrics_dir` makes /metrics the totals of all workers (Metrics);
    `freshen` is awaited before each search (several workers: apply the others' acknowledged writes);
    `processes` names the server's processes for the process metrics (Metrics).

    `app.state.api` is the app's ApiCore: the gRPC service of the same process (server.grpc_service)
    answers through it, with this app's limits, token and metrics."""
    metrics = Metrics(metrics_dir, processes)
    if reloader is not None:
        reloader.add_listener(lambda outcome, info: metrics.reloads.labels(outcome=outcome).inc())
    retriever.holder.subscribe(metrics.on_swap)
    if retriever.monitor is not None:
        metrics.watch(retriever.monitor)
    models = request_models(retriever.max_k, retriever.max_id_length, max_items_per_write)
    # redirect_slashes off: Starlette would build the redirect's Location from the Host header
    app = FastAPI(
        title="towerann",
        summary="two-tower retrieval: top-K candidates for a user, now",
        responses={},
        redirect_slashes=False,
    )
    delta = getattr(writer, "delta", None)
    api = ApiCore(retriever, metrics, models, writer, reloader, token, delta, freshen, max_body_bytes)
    app.state.retriever, app.state.metrics, app.state.api = retriever, metrics, api
    _add_read_routes(app, api)
    _add_write_routes(app, api)
    _add_error_handlers(app)

    # Unexpected exceptions are answered by GuardMiddleware: a handler registered here for Exception
    # would sit in Starlette's outermost middleware, which re-raises after answering, and the server
    # would then drop the keep-alive connection.
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
        worker=worker,
        direct=functools.partial(direct_candidates, api),
    )
    return app


# ---- the API whatever the transport: HTTP (the routes below) and gRPC (server.grpc_service) ----------


class InvalidBody(BadRequest):
    """A request that its model refused (a field of the wrong type, too long, unknown, missing): HTTP 422."""

    http_status = 422


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    """The HTTP status and the one-line message of a request body its model refused (pydantic's errors)."""
    for e in errors:
        if e.get("type") == "not_utf8":  # RequestBody's check
            return 400, str(e["msg"])
        if e.get("type") == "string_unicode":  # pydantic's own, on a path parameter or a constrained string
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "path"))
            return 400, f"{loc or 'request'}: a string that {NOT_UTF8}"
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "request body is not valid JSON"
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 400, "request body must be a JSON object, sent with Content-Type: application/json"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def check_bearer(token: str | None, authorization: str) -> None:
    """The bearer token of every route that needs it (writes and admin), from an HTTP Authorization header
    or the gRPC metadata of the same name. The message never shows a token, given or configured."""
    if token is None:
        raise Forbidden(
            "writes and admin routes are disabled: no API token is configured (set "
            "TOWERANN_API_TOKEN or [freshness] token_file)"
        )
    scheme, _, given = authorization.strip().partition(" ")
    # the scheme in any case (RFC 9110); the token compared in constant time, whatever the scheme was
    same = hmac.compare_digest(given.strip().encode(), token.encode())
    if not (same and scheme.lower() == "bearer"):
        raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")


def candidates_body(c: Candidates) -> dict[str, Any]:
    """The JSON answer of POST /v1/candidates."""
    body: dict[str, Any] = {
        "candidates": [{"item_id": i, "score": s} for i, s in zip(c.item_ids, c.scores)],
        "model_version": c.model_version,
        "index_version": c.index_version,
        "timings_ms": c.timings_ms,
        "degraded": c.degraded,
    }
    if c.partial:  # absent otherwise: an unsharded answer has nothing to say here
        body.update(partial=True, missing_shards=list(c.missing_shards))
    return body


class ApiCore:
    """What the candidates, events, readiness and reload calls answer, whatever the transport: the HTTP
    routes of create_app and the gRPC service (server.grpc_service) both call these, so the checks of a
    request (this app's models: max_k, max_id_length, ...), the bearer token, the metrics, the access-log
    notes and the degraded / partial flags are one piece of code. Errors are TowerannErrors, which each
    transport answers in its own way (HTTP: the status and {"error": message}; gRPC: the matching code and
    the same message).

    Everything here runs on the server's event loop, one call at a time between awaits: that serialises
    searches with the live index writes without a lock (see the module's docstring)."""

    def __init__(
        self,
        retriever: Retriever,
        metrics: Metrics,
        models: SimpleNamespace,
        writer: ItemWrites | None,
        reloader: BundleReloads | None,
        token: str | None,
        delta: Any,
        freshen: Callable[[], Awaitable[None]] | None,
        max_body_bytes: int,
    ) -> None:
        self.retriever, self.metrics, self.models = retriever, metrics, models
        self.writer, self.reloader, self.token, self.delta = writer, reloader, token, delta
        self.freshen = freshen
        self.max_body_bytes = max_body_bytes

    def parse(self, model: type[BaseModel], body: dict[str, Any]) -> Any:
        """`body` (a request's fields, as its JSON object would carry them) checked by `model`, one of this
        app's request models: a refusal is the HTTP route's error, with its message (InvalidBody: 422)."""
        try:
            return model.model_validate(body)
        except ValidationError as e:
            status, message = validation_message(e.errors())
            raise (InvalidBody if status == 422 else BadRequest)(message) from None

    async def candidates(self, req: CandidatesBody) -> Candidates:
        noted = access.note()
        if noted is not None:
            noted["k"] = req.k
        flt = None if req.filter is None else req.filter.model_dump()
        if self.freshen is not None:
            await self.freshen()
        c = await self.retriever.candidates_async(req.user_id, req.k, flt, query_vector=req.query_vector)
        observe = self.metrics.stage_children
        for stage, ms in c.timings_ms.items():
            observe[stage].observe(ms / 1e3)
        if c.degraded:
            self.metrics.degraded.inc()
            if noted is not None:
                noted["degraded"] = True
        if c.partial:
            self.metrics.partial.inc()
            if noted is not None:
                noted.update(partial=True, missing_shards=list(c.missing_shards))
        return c

    async def event(self, req: EventBody) -> dict[str, Any]:
        e = await self.retriever.record_event_async(req.user_id, req.item_id, req.type, req.ts)
        return {"user_id": e.user_id, "item_id": e.item_id, "type": e.type, "ts": e.ts}

    async def probe(self, dependency: Any) -> str:
        """ "up" or "down", within [features] timeout_ms; a dependency that failed a moment ago is not waited on."""
        if not getattr(dependency, "does_io", False):
            try:
                dependency.ping()
                return "up"
            except Exception:
                return "down"
        if not dependency.available():
            return "down"
        try:
            await asyncio.wait_for(asyncio.to_thread(dependency.ping), self.retriever.features_timeout_s)
            return "up"
        except (TimeoutError, TowerannError):
            return "down"

    async def readiness(self) -> dict[str, Any]:
        """GET /readyz's answer while a bundle is served, with each dependency's state; BackendUnavailable
        (503) until a bundle is loaded."""
        retriever, holder, delta = self.retriever, self.retriever.holder, self.delta
        if not holder.ready:
            raise BackendUnavailable("no retrieval bundle loaded yet")
        deps = {"features": await self.probe(retriever.store)}
        not_durable = getattr(getattr(delta, "link", None), "not_durable", None)  # a Redis that stopped logging
        if delta is not None:
            deps["delta_log"] = await self.probe(delta)
            if not_durable and deps["delta_log"] == "up":
                deps["delta_log"] = "not durable"
        b = holder.current()
        shards = getattr(b.index, "missing_shards", None)  # a sharded index: are answers partial now?
        missing = list(shards()) if shards is not None else []
        if shards is not None:
            deps["shards"] = "partial" if missing else "up"
        degraded = any(state != "up" for state in deps.values())
        # The recall monitor's verdict is a detail, not readiness: a bundle that finds less than it
        # should still serves (pulling every replica of it out of the load balancer would serve nothing).
        recall = {} if retriever.monitor is None else {"recall": retriever.monitor.health(b.version)}
        # No path: anyone may ask /readyz, and the disk layout is for the server's log (the version names the bundle)
        bundle = {key: value for key, value in b.describe().items() if key != "path"}
        why = {"durability": f"{not_durable}: item writes and clicks are refused until Redis logs writes again"}
        return {
            "status": "ready",
            "degraded": degraded,
            "dependencies": deps,
            **recall,
            **(why if not_durable else {}),
            **({"missing_shards": missing} if missing else {}),
            **bundle,
        }

    def writes_enabled(self) -> ItemWrites:
        if self.writer is None:
            raise NotFound("item writes are not enabled on this server")
        return self.writer

    def authorize(self, authorization: str) -> None:
        """Every write and the reload: writes enabled on this server, then the bearer token."""
        self.writes_enabled()
        check_bearer(self.token, authorization)

    async def reload(self, reason: str) -> dict[str, Any]:
        """Load the bundle CURRENT names now (validated; refused if bad, the old one keeps serving)."""
        if self.reloader is None:
            raise NotFound("this server does not serve a bundle root with CURRENT; nothing to reload")
        # off the loop: requests keep being answered
        return await asyncio.to_thread(self.reloader.reload, reason)


# ---- the HTTP routes ------------------------------------------------------------------------------


def _add_read_routes(app: FastAPI, api: ApiCore) -> None:
    """candidates, events, healthz, readyz, metrics: no token."""
    models, metrics = api.models, api.metrics
    if not TYPE_CHECKING:  # FastAPI reads the handlers' parameter types: this app's models, with its limits
        CandidatesBody, EventBody = models.CandidatesRequest, models.EventRequest

    # The request handlers are `async` on purpose: they run on the event loop, one at a time. A
    # request is ~1-2 ms of CPU, mostly under the GIL; in uvicorn's thread pool, concurrent
    # requests fought over the GIL and the p99 at 200 requests/s grew ten-fold.
    @app.post("/v1/candidates", response_model=None, responses={200: {"model": CandidatesResponse}, **ERRORS})
    async def candidates(req: CandidatesBody) -> Response:
        return await candidates_answer(api, req)

    @app.post("/v1/events", response_model=EventResponse, responses=ERRORS)
    async def events(req: EventBody) -> dict[str, Any]:
        return await api.event(req)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: answered on the event loop at once; touches no store."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: _JSON_ERROR})
    async def readyz() -> Response:
        """200 while a bundle is served, with each dependency's state; 503 until a bundle is loaded."""
        return JSONResponse(await api.readiness())

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format",
            }
        },
    )
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _add_write_routes(app: FastAPI, api: ApiCore) -> None:
    """Item writes and the admin reload: bearer token."""
    retriever, models, delta = api.retriever, api.models, api.delta
    holder = retriever.holder
    if not TYPE_CHECKING:  # as in _add_read_routes: this app's model
        ItemsBody = models.ItemsRequest
    PathItemId = Annotated[
        str, Path(min_length=1, max_length=retriever.max_id_length, description="the catalog's item id")
    ]
    # Item writes run in one worker thread: their checks, the item tower and the delta log's append
    # (a round trip to Redis, which may hang; an fsync on SQLite) never hold the loop. Only the index
    # change runs on the loop (apply_on), where no search can overlap it, a slice at a time
    # (freshness.live.SLICE_S), so searches wait neither on the log nor on a whole batch.
    write_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="towerann-write")
    app.state.write_pool = write_pool

    async def authorize(request: Request) -> None:
        """A dependency of every write route: FastAPI runs it before it validates the body, so a
        request without the token gets 401 whatever it carries. (async: no thread-pool hop.)"""
        api.authorize(request.headers.get("authorization", ""))

    async def authorize_admin(request: Request) -> None:
        """The bearer token, for the admin reads."""
        check_bearer(api.token, request.headers.get("authorization", ""))

    async def write(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        if getattr(delta, "does_io", False) and not delta.available():
            raise BackendUnavailable(
                "the delta log's Redis is unavailable (it failed a moment ago); nothing was written: retry later"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(write_pool, functools.partial(fn, *args, apply_on=on_loop(loop)))

    authorized = [Depends(authorize)]

    @app.post("/v1/items", responses=WRITE_ERRORS, dependencies=authorized)
    async def upsert_items(req: ItemsBody) -> dict[str, Any]:
        """Embed the items with the item tower (a vectors-only bundle: take their `vector`) and add them to
        the live index: searchable on return."""
        noted = access.note()
        if noted is not None:
            noted["items"] = len(req.items)
        return await write(api.writes_enabled().upsert, entry_rows(req.items, holder.current(), retriever))

    @app.patch("/v1/items/{item_id}", responses=WRITE_ERRORS, dependencies=authorized)
    async def set_available(item_id: PathItemId, req: AvailabilityRequest) -> dict[str, Any]:
        return await write(api.writes_enabled().set_available, retriever.item_key(item_id), req.available)

    @app.delete("/v1/items/{item_id}", responses=WRITE_ERRORS, dependencies=authorized)
    async def delete_item(item_id: PathItemId) -> dict[str, Any]:
        return await write(api.writes_enabled().delete, retriever.item_key(item_id))

    @app.post("/v1/admin/reload", responses={409: _JSON_ERROR, **WRITE_ERRORS}, dependencies=[Depends(authorize)])
    async def reload() -> JSONResponse:
        """Load the bundle CURRENT names now (validated; refused if bad, the old one keeps serving)."""
        info = await api.reload("POST /v1/admin/reload")
        return JSONResponse(info, status_code=409 if info["outcome"] == "refused" else 200)

    @app.get(
        "/v1/admin/recall",
        responses={k: v for k, v in WRITE_ERRORS.items() if k in (401, 403, 404)},
        dependencies=[Depends(authorize_admin)],
    )
    async def recall() -> JSONResponse:
        """The online recall monitor: recall@k vs exact search of sampled live requests, per bundle
        version and filter kind, with sample sizes ([monitor] in the config)."""
        if retriever.monitor is None:
            raise NotFound("the recall monitor is off on this server ([monitor] sample = 0)")
        served = holder.current().version if holder.ready else None
        return JSONResponse({"served": served, **retriever.monitor.snapshot()})


APPLY_WAIT_S = 60.0  # the loop runs a change within milliseconds; this only bounds a loop that is shutting down


def on_loop(loop: asyncio.AbstractEventLoop) -> ApplyOn:
    """An ApplyOn for a worker thread: run the change on `loop` between two handlers, and wait for it."""

    def apply(change: Callable[[], object]) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                change()
            except BaseException as e:  # handed back to the waiting thread, which raises it
                done.set_exception(e)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(timeout=APPLY_WAIT_S)

    return apply


async def candidates_answer(api: ApiCore, req: CandidatesBody) -> Response:
    """The 200 answer of POST /v1/candidates to a checked request."""
    c = await api.candidates(req)
    # orjson: at k=1000, json.dumps costs ~0.8 ms a request, as much as the retrieval itself
    return Response(orjson.dumps(candidates_body(c)), media_type="application/json")


async def direct_candidates(api: ApiCore, body: bytes) -> Response | None:
    """POST /v1/candidates without FastAPI's routing, dependency and body layers (GuardMiddleware calls
    it): the body parsed by orjson, checked by the same request model, answered as the route answers.
    Those layers took ~0.25 ms a request (K=1000, called in-process: 0.72 ms from the app's entry to
    its answer besides the Retriever's own time, 0.48-0.54 ms without them), where issue 26's 1,279
    requests/s on 2 cores at 1M items comes to ~1.5 ms of CPU a request in all. None where the body
    does not parse (orjson is stricter than json: NaN, integers past 64 bits) or fails the model: the
    routed app then answers it, with FastAPI's validation message, as before."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    try:
        req = api.parse(api.models.CandidatesRequest, fields)
    except BadRequest:
        return None
    try:
        return await candidates_answer(api, req)
    except TowerannError as e:
        return error_answer(e)


def error_answer(exc: TowerannError) -> JSONResponse:
    """The answer to a TowerannError: its status and {"error": message}."""
    if isinstance(exc, ShardsUnavailable):  # which shards, as a partial answer would say
        return JSONResponse({"error": str(exc), "missing_shards": list(exc.missing_shards)}, status_code=503)
    return _error(exc.http_status, str(exc))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TowerannError)
    async def towerann_error(request: Request, exc: TowerannError) -> JSONResponse:
        return error_answer(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on 405
        return response

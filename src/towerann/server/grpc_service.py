"""The gRPC service towerann.v1.Retrieval (src/towerann/client/towerann_v1.proto) over the HTTP app's ApiCore.

Every call is the HTTP route's: its fields become the body the route would have parsed and go through the
same request model (this app's limits: max_k, max_id_length), the same ApiCore call (the Retriever, the
freshen of several workers, the stage metrics, the degraded and partial counters, the access-log notes)
and the same token check; only the encoding differs. An error is the HTTP answer's: its one-line message
in the status details, with the code of its HTTP status (CODES). Nothing here runs off the event loop,
so searches stay serialised with the live index writes as they are over HTTP (serving.app).

Request size: a message over [serve] max_body_bytes is RESOURCE_EXHAUSTED with HTTP's 413 message (checked
as it is decoded); gRPC's own limit, at 4x that, refuses larger ones before they are read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
import orjson
from google.protobuf.message import DecodeError
from grpc import aio

from towerann.client import towerann_v1_pb2 as pb
from towerann.errors import ArtifactError, BadRequest, ShardsUnavailable, TowerannError
from towerann.serving import access
from towerann.serving.app import ApiCore, body_too_large

log = logging.getLogger(__name__)

SERVICE = "towerann.v1.Retrieval"
# The HTTP status of an error -> the gRPC code that means the same (the message is HTTP's, word for word).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
HARD_LIMIT_FACTOR = 4  # gRPC's own receive limit: this many times [serve] max_body_bytes


@dataclass(frozen=True)
class Refused:
    """A request that could not be decoded (too large, not the message it should be): answered with `error`."""

    error: TowerannError


class TooLarge(BadRequest):
    http_status = 413


def reader(message: Any, max_bytes: int) -> Callable[[bytes], Any]:
    """The request deserializer: never raises (gRPC would answer an exception there with INTERNAL)."""
    name = message.DESCRIPTOR.full_name

    def read(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Refused(TooLarge(body_too_large(max_bytes)))
        try:
            return message.FromString(data)
        except DecodeError as e:
            detail = str(e).rsplit(": ", 1)[-1]
            return Refused(BadRequest(f"request is not a valid {name} message ({detail})"))

    return read


def _id(message: Any, oneof: str) -> str | int | None:
    which = message.WhichOneof(oneof)
    return None if which is None else getattr(message, which)


class RetrievalService:
    """The calls of towerann.v1.Retrieval; `handler()` is what a grpc.aio server serves."""

    def __init__(self, api: ApiCore):
        self.api = api
        self.models = api.models
        self.counts = api.metrics.grpc_requests

    # ---- the calls ----------------------------------------------------------------------------------

    async def candidates(self, req: pb.CandidatesRequest, context: aio.ServicerContext) -> pb.CandidatesResponse:
        body: dict[str, Any] = {}
        user = _id(req, "user")
        if user is not None:
            body["user_id"] = user
        if req.query_vector:
            body["query_vector"] = list(req.query_vector)
        if req.HasField("k"):
            body["k"] = req.k
        if req.filter:
            body["filter"] = {key: list(v.values) for key, v in req.filter.items()}
        c = await self.api.candidates(self.api.parse(self.models.CandidatesRequest, body))
        # ids as the catalog has them: all integers (an integer catalog) or all strings
        integers = bool(c.item_ids) and isinstance(c.item_ids[0], int)
        return pb.CandidatesResponse(
            item_ids_int=cast(list[int], c.item_ids) if integers else (),
            item_ids_str=() if integers else cast(list[str], c.item_ids),
            scores=c.scores,
            model_version=c.model_version,
            index_version=c.index_version,
            timings_ms=c.timings_ms,
            degraded=c.degraded,
            partial=c.partial,
            missing_shards=c.missing_shards,
        )

    async def event(self, req: pb.EventRequest, context: aio.ServicerContext) -> pb.EventResponse:
        body: dict[str, Any] = {}
        for field, oneof in (("user_id", "user"), ("item_id", "item")):
            value = _id(req, oneof)
            if value is not None:
                body[field] = value
        if req.HasField("type"):
            body["type"] = req.type
        if req.HasField("ts"):
            body["ts"] = req.ts
        return pb.EventResponse(**await self.api.event(self.api.parse(self.models.EventRequest, body)))

    async def health(self, req: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")

    async def ready(self, req: pb.ReadyRequest, context: aio.ServicerContext) -> pb.ReadyResponse:
        body = await self.api.readiness()
        return pb.ReadyResponse(
            degraded=body["degraded"],
            dependencies=body["dependencies"],
            index_version=body.get("index_version") or "",
            model_version=body.get("model_version") or "",
            missing_shards=body.get("missing_shards", ()),
            body_json=orjson.dumps(body).decode(),
        )

    async def reload(self, req: pb.ReloadRequest, context: aio.ServicerContext) -> pb.ReloadResponse:
        self.api.authorize(_metadata(context, "authorization"))
        info = await self.api.reload("gRPC Reload")
        if info["outcome"] == "refused":  # HTTP: 409 with this body
            raise ArtifactError(str(info.get("error") or "the bundle was refused"))
        return pb.ReloadResponse(outcome=info["outcome"], body_json=orjson.dumps(info).decode())

    # ---- plumbing -----------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        calls: dict[str, tuple[Callable[..., Awaitable[Any]], Any]] = {
            "Candidates": (self.candidates, pb.CandidatesRequest),
            "Event": (self.event, pb.EventRequest),
            "Health": (self.health, pb.HealthRequest),
            "Ready": (self.ready, pb.ReadyRequest),
            "Reload": (self.reload, pb.ReloadRequest),
        }
        declared = set(pb.DESCRIPTOR.services_by_name["Retrieval"].methods_by_name)
        if declared != set(calls):  # the .proto and this service must not drift apart
            raise AssertionError(f"{SERVICE}: the proto declares {sorted(declared)}, this serves {sorted(calls)}")
        max_bytes = self.api.max_body_bytes
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._answered(name, fn),
                    request_deserializer=reader(message, max_bytes),
                    response_serializer=lambda m: m.SerializeToString(),
                )
                for name, (fn, message) in calls.items()
            },
        )

    def _answered(self, name: str, fn: Callable[[Any, aio.ServicerContext], Awaitable[Any]]) -> Any:
        """`fn` with what GuardMiddleware does for HTTP: errors answered (a TowerannError with its code and
        message, anything else a logged INTERNAL), the call counted by method and code, its access-log line."""
        route = f"/{SERVICE}/{name}"
        counts: dict[grpc.StatusCode, Any] = {}  # a series per code once it occurs (no zeros for every code)

        async def call(request: Any, context: aio.ServicerContext) -> Any:
            logged = access.access_log.isEnabledFor(logging.INFO)  # off: nothing more is done for the access log
            if logged:
                t0 = time.perf_counter()
                fields, token = access.start()
            status, code = 200, grpc.StatusCode.OK
            try:
                if isinstance(request, Refused):
                    raise request.error
                return await fn(request, context)
            except TowerannError as e:
                status = e.http_status
                code = CODES.get(status, grpc.StatusCode.UNKNOWN)
                trailing: tuple[tuple[str, str], ...] = ()
                if isinstance(e, ShardsUnavailable):  # which shards, as HTTP's 503 body says
                    trailing = (("towerann-missing-shards", ",".join(str(s) for s in e.missing_shards)),)
                await context.abort(code, str(e), trailing_metadata=trailing)
            except asyncio.CancelledError:  # the client went away, or its deadline passed: HTTP's 499
                status, code = 499, grpc.StatusCode.CANCELLED
                raise
            except aio.AbortError:
                raise
            except Exception as e:
                log.exception("unexpected error on gRPC %s", route)
                status, code = 500, grpc.StatusCode.INTERNAL
                await context.abort(code, f"internal error ({type(e).__name__}); see the server log")
            finally:
                counter = counts.get(code)
                if counter is None:
                    counter = counts[code] = self.counts.labels(method=name, code=code.name)
                counter.inc()
                if logged:  # the gRPC code too (JSON log: grpc_code); the status is the HTTP one it stands for
                    fields["grpc_code"] = code.name
                    access.finish(token, "POST", route, status, time.perf_counter() - t0, fields)

        return call


def _metadata(context: aio.ServicerContext, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return ""

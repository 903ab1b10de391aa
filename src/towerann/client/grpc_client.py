"""The gRPC client of a running `towerann serve --grpc-port N`: the read path of the HTTP client over the
binary transport (towerann.v1.Retrieval, towerann_v1.proto beside this file), with the same method names,
arguments and answers.

    from towerann.client import GrpcClient

    with GrpcClient("127.0.0.1:50051") as c:                  # token: only reload() needs it
        got = c.candidates("42", k=1000, filter={"categories": ["cat_0001"], "in_stock": [True]})
        got.item_ids, got.scores, got.degraded, got.partial  # the same Candidates as Client.candidates
        c.event("42", 1234)

The answer's ids and scores travel as two packed arrays (int64 ids for a catalog of integer ids, strings
otherwise), not as a message per candidate: at K = 1000 that is most of what the transport saves. One
HTTP/2 channel carries every call (calls from several threads share it); retries with exponential backoff
where they are safe, as the HTTP client: on UNAVAILABLE (the server answers it before it has written
anything, and a connection that cannot be made is UNAVAILABLE too), and on DEADLINE_EXCEEDED only for calls
that can be repeated without effect (not clicks). Errors are the exceptions the Python API raises
(towerann.errors), with the server's one-line message; the token never appears in them.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from towerann.client import towerann_v1_pb2 as pb
from towerann.client import towerann_v1_pb2_grpc as pb_grpc
from towerann.client.http_client import Candidates, filter_body
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

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
NOT_UTF8 = "cannot be encoded as UTF-8 (a lone surrogate such as \\ud800); send valid Unicode text"
# The server's status codes, as the HTTP client's statuses: the same exceptions either way.
ERRORS_BY_CODE: dict[grpc.StatusCode, type[TowerannError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BadRequest,  # HTTP 413: a request over [serve] max_body_bytes
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: Forbidden,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: ArtifactError,  # HTTP 409: a reload refused
    grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: BackendUnavailable,
}


def _text(value: str, field: str) -> str:
    """A string for a proto field: one UTF-8 cannot encode gets the server's words for it (protobuf would
    refuse it with a UnicodeEncodeError)."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise BadRequest(f"{field}: a string that {NOT_UTF8}") from None
    return value


def _set_id(message: Any, field: str, value: Any) -> None:
    """An id into its oneof: an integer as int64 (`<field>_int`), a string as it is. An integer beyond
    int64 goes as its decimal spelling, which is what the server makes of any integer id."""
    if isinstance(value, int) and not isinstance(value, bool):
        if INT64_MIN <= value <= INT64_MAX:
            setattr(message, f"{field}_int", value)
            return
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a non-empty string or an integer, got {value!r}")
    setattr(message, field, _text(value, field))


def candidates_request(
    user_id: str | int | None,
    k: int,
    categories: Sequence[str] | None = None,
    query_vector: Sequence[float] | None = None,
    filter: Mapping[str, Sequence[str | bool] | None] | None = None,
) -> pb.CandidatesRequest:
    """The request message of Client.candidates()' arguments (what `bench serve --grpc` sends, too)."""
    req = pb.CandidatesRequest()
    if user_id is not None:
        _set_id(req, "user_id", user_id)
    if query_vector is not None:
        values = [float(x) for x in query_vector]
        bad = [i for i, x in enumerate(values) if not math.isfinite(x)]
        if bad:  # the HTTP client's own answer to it, without a request
            raise BadRequest(f"query_vector holds a NaN or infinite value at position {bad[0]}")
        req.query_vector.extend(values)
    if isinstance(k, bool) or not isinstance(k, int) or not INT64_MIN <= k <= INT64_MAX:
        raise BadRequest(f"k must be an integer between 1 and the server's max_k, got {k!r}")
    req.k = k
    for key, values in (filter_body(categories, filter) or {}).items():
        if values is None:  # no condition on this key, as in the HTTP body
            continue
        if isinstance(values, str) or not isinstance(values, list):
            raise BadRequest(f"filter.{key} must be a non-empty list of values, got {str(values)[:100]!r}")
        spelled = []
        for v in values:
            if isinstance(v, bool):  # an attribute's vocabulary spells booleans so
                spelled.append("true" if v else "false")
            elif isinstance(v, str):
                spelled.append(_text(v, f"filter.{key}"))
            else:
                raise BadRequest(f"filter.{key}: values are strings or booleans, got {v!r}")
        req.filter[_text(str(key), "filter")].values.extend(spelled)
    return req


def candidates_of(r: pb.CandidatesResponse) -> Candidates:
    """The answer as Client.candidates returns it: ids as the catalog has them (ints for integer catalogs)."""
    ids: list[int | str] = list(r.item_ids_int) if r.item_ids_int else list(r.item_ids_str)
    return Candidates(
        item_ids=ids,
        scores=list(r.scores),
        model_version=r.model_version,
        index_version=r.index_version,
        timings_ms=dict(r.timings_ms),
        degraded=r.degraded,
        missing_shards=list(r.missing_shards),
    )


class GrpcClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout_s: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        options: Sequence[tuple[str, Any]] = (),
    ):
        """`target`: HOST:PORT of `towerann serve --grpc-port` (or any gRPC target, e.g. dns:///name:port);
        `options`: more gRPC channel arguments."""
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("retries >= 0, timeout_s > 0 and backoff_s >= 0 are required")
        self.target = target
        self._shown = redact(target)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(target, options=list(options))
        self.stub = pb_grpc.RetrievalStub(self._channel)

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
        """Top-k items for this user now (see Client.candidates: the same arguments and answer)."""
        req = candidates_request(user_id, k, categories, query_vector, filter)
        return candidates_of(self._call("Candidates", self.stub.Candidates, req, repeatable=True))

    def health(self) -> dict[str, Any]:
        """GET /healthz's answer: {"status": "ok"}."""
        return {"status": self._call("Health", self.stub.Health, pb.HealthRequest(), repeatable=True).status}

    def ready(self) -> dict[str, Any]:
        """GET /readyz's answer: the served versions and each dependency's state (BackendUnavailable while
        not ready)."""
        answer: dict[str, Any] = json.loads(self._call("Ready", self.stub.Ready, pb.ReadyRequest(), True).body_json)
        return answer

    # ---- writes -------------------------------------------------------------------------------------

    def event(
        self, user_id: str | int, item_id: str | int, type: str = "click", ts: float | None = None
    ) -> dict[str, Any]:
        """Record a session event; stored before the reply. Not retried after a deadline (it could count twice)."""
        req = pb.EventRequest()
        _set_id(req, "user_id", user_id)
        _set_id(req, "item_id", item_id)
        if not isinstance(type, str):
            raise BadRequest(f"type must be a non-empty string, got {type!r}")
        req.type = _text(type, "type")
        if ts is not None:
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise BadRequest(f"ts must be unix seconds (a finite number), got {ts!r}")
            req.ts = float(ts)
        r = self._call("Event", self.stub.Event, req, repeatable=False)
        return {"user_id": r.user_id, "item_id": r.item_id, "type": r.type, "ts": r.ts}

    def reload(self) -> dict[str, Any]:
        """Load the bundle CURRENT names now (bearer token); ArtifactError if the server refused it."""
        answer: dict[str, Any] = json.loads(self._call("Reload", self.stub.Reload, pb.ReloadRequest(), True).body_json)
        return answer

    # ---- plumbing -----------------------------------------------------------------------------------

    def _call(self, name: str, method: Callable[..., Any], request: Any, repeatable: bool) -> Any:
        where = f"{name} {self._shown}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
                retry = code == grpc.StatusCode.UNAVAILABLE or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and repeatable
                )
                if last or not retry:
                    details = e.details() if callable(getattr(e, "details", None)) else None
                    cls = ERRORS_BY_CODE.get(code, TowerannError)
                    raise cls(f"{where} -> {code.name}: {redact(details or '(no details)')}") from None
            time.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Python clients of a running `towerann serve`: `Client` over HTTP (http_client.py: candidates, click events,
item writes, reloads) and `GrpcClient` over gRPC (grpc_client.py: the read path, the same method names,
arguments and answers; `serve --grpc-port`).

    from towerann.client import Client, GrpcClient

    with Client("http://127.0.0.1:8000") as c:
        got = c.candidates("42", k=100, filter={"categories": ["cat_0001"]})
    with GrpcClient("127.0.0.1:50051") as c:
        got = c.candidates("42", k=100, filter={"categories": ["cat_0001"]})   # the same Candidates

The gRPC modules (towerann_v1_pb2*.py) are generated from towerann_v1.proto by tools/gen_grpc.sh and
committed; GrpcClient (and with it grpcio) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.client.http_client import ERRORS_BY_STATUS, RETRY_STATUSES, Candidates, Client
from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.client.grpc_client import GrpcClient

__all__ = ["ERRORS_BY_STATUS", "RETRY_STATUSES", "Candidates", "Client", "GrpcClient"]
__getattr__ = lazy_names(__name__, {"GrpcClient": "grpc_client"})

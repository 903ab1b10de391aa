"""`towerann serve --grpc-port N` ([serve] grpc_port): the gRPC service (server.grpc_service) beside HTTP.

Where it runs: a grpc.aio server on the event loop uvicorn runs, in the same process, over the same
ApiCore (app.state.api), not a gRPC server thread beside it. The request path relies on every search
running on the loop, one at a time between awaits: that is what keeps searches apart from live index
writes without a lock on the read path (serving.app), and it is what kept p99 low in the measurements
the HTTP handlers are built on (in a thread pool, concurrent requests fought over the GIL and the p99
grew ten-fold). A gRPC thread would bring both problems back; on the loop, one worker's throughput is
shared between the two transports, not split by a second interpreter lock holder.

Started before HTTP answers (a /readyz that answers means gRPC does too), stopped with it: uvicorn's
graceful shutdown and gRPC's (in-flight calls get GRACE_S) run together.

With `--workers N` each worker process binds the gRPC port itself with SO_REUSEPORT (grpc.so_reuseport):
the kernel spreads new connections over them. A gRPC client keeps one HTTP/2 connection per channel, so
one channel's calls all go to one worker: open several channels (or connections behind a load balancer)
to use every worker. One process binds without it, so a port another server holds is an error.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

import uvicorn

from towerann.config import ServeConfig
from towerann.errors import ConfigError

if TYPE_CHECKING:  # grpc is imported where it serves, never by a server without --grpc-port
    from grpc import aio

log = logging.getLogger(__name__)

GRACE_S = 10.0  # a gRPC call in flight when the server stops gets this long to finish


def check_ports(serve: ServeConfig) -> None:
    """The gRPC port may not be the HTTP one (both would bind it, one of them in vain)."""
    if serve.grpc_port and serve.grpc_port == serve.port:
        raise ConfigError(f"--grpc-port {serve.grpc_port} is the HTTP --port too; give gRPC a port of its own")


def check_port_free(host: str, port: int) -> None:
    """Before the workers start: the gRPC port can be bound (with SO_REUSEPORT, as the workers bind it), so
    a port another server holds is one line at start, not a worker that dies later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} for gRPC ({e.strerror}); pick another --grpc-port or --host"
            ) from e


async def start_grpc(api: Any, host: str, port: int, reuse_port: bool = False) -> aio.Server:
    """A started grpc.aio server of towerann.v1.Retrieval over `api` (serving.app.ApiCore) on host:port,
    on the running event loop."""
    from grpc import aio

    from towerann.server.grpc_service import HARD_LIMIT_FACTOR, RetrievalService

    server = aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", HARD_LIMIT_FACTOR * api.max_body_bytes),
        ]
    )
    server.add_generic_rpc_handlers((RetrievalService(api).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} for gRPC ({e}); pick another --grpc-port or --host"
        ) from None
    await server.start()
    log.info("gRPC (towerann.v1.Retrieval) on %s", address)
    return server


class HttpAndGrpc(uvicorn.Server):
    """uvicorn's server, with the gRPC server on its event loop from startup to shutdown."""

    def __init__(self, config: uvicorn.Config, api: Any, host: str, grpc_port: int, reuse_port: bool = False):
        super().__init__(config)
        self.api, self.grpc_host, self.grpc_port, self.reuse_port = api, host, grpc_port, reuse_port
        self.grpc: aio.Server | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.grpc = await start_grpc(self.api, self.grpc_host, self.grpc_port, self.reuse_port)
        try:
            await super().startup(sockets)
        except BaseException:
            await self.grpc.stop(None)
            raise

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is None:
            await super().shutdown(sockets)
            return
        await asyncio.gather(super().shutdown(sockets), self.grpc.stop(GRACE_S))


def http_server(config: uvicorn.Config, app: Any, serve: ServeConfig, reuse_port: bool = False) -> uvicorn.Server:
    """The uvicorn server of `app`; with [serve] grpc_port, with the gRPC service beside it (same loop, same
    ApiCore). `reuse_port`: one of several workers on the port."""
    if not serve.grpc_port:
        return uvicorn.Server(config)
    check_ports(serve)
    return HttpAndGrpc(config, app.state.api, serve.host, serve.grpc_port, reuse_port)

"""The Bento's own V2 REST listener: the V2 ASGI app on uvicorn, in the worker's event loop.

Served next to BentoML's HTTP server (which keeps the native API, /metrics and its own
copy of the V2 routes) and to the gRPC server, sharing the worker's one `InferenceCore`
and batcher. Nothing sits between the socket and the V2 app: no BentoML middleware
(tracing, access log, traffic control, metrics), which cost ~70% of throughput when
measured. httptools parses HTTP when installed (it is a serving requirement), h11 otherwise.

Signals stay BentoML's: this server never installs handlers; the service stops it from its
shutdown hook (`HttpEndpoint.stop`), letting in-flight requests finish.

Limits against clients that hold resources: at most `max_connections` connections and
requests at once (uvicorn's `limit_concurrency`: 503 beyond it), and each request's head and
body must arrive within `read_timeout_s` of its first byte (of the connection, for a fresh
one); a client that opens a connection and sends nothing, or trickles a request, is
disconnected. uvicorn has no such timeout of its own: `_TimedHttpToolsProtocol` adds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
from collections.abc import Iterator
from typing import Any, cast

import uvicorn

log = logging.getLogger("bento_canary.v2.http")


class _OneWritePerTurn:
    """A transport whose writes made in one turn of the event loop leave as one.

    uvicorn writes a response's status and headers, then its body, as two writes. A worker
    killed between the two (SIGKILL, the OOM killer) left nginx a 200 without its body, which
    it cannot retry on the other slot once the headers are passed on: the client got a
    truncated answer (`make chaos`, candidate SIGKILLed at 30%: 1 of 4,367 requests). One
    write per response is delivered whole or not at all. Everything else is the transport's.
    """

    __slots__ = ("_transport", "_loop", "_parts")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _timed_protocol(read_timeout_s: float) -> type[asyncio.Protocol] | str:
    """httptools' protocol with a read timeout per request (h11 without one, when httptools
    is missing: it is a serving requirement, so only a broken install gets there)."""
    if importlib.util.find_spec("httptools") is None:
        log.warning("httptools is not installed: the V2 REST listener runs on h11 without a read timeout")
        return "h11"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _TimedHttpToolsProtocol(HttpToolsProtocol):
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(cast(asyncio.Transport, _OneWritePerTurn(transport, self.loop)))
            self._arm()  # a fresh connection must send its request in time too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()  # the request is in: from here the app and keep-alive take over
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return _TimedHttpToolsProtocol


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: the hosting worker owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpEndpoint:
    """A running V2 REST listener; `port` is the bound one (useful after binding port 0)."""

    def __init__(self, server: _EmbeddedServer, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, give in-flight requests `grace` seconds, then close."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 1.0)
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 1.0)


def _bind(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT
    if reuse_port:  # the slot's workers share the port; never a port some other server holds
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the V2 REST listener to {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def start_http_server(
    app: Any, host: str, port: int, *, keep_alive_s: float = 5.0, backlog: int = 2048,
    read_timeout_s: float = 10.0, max_connections: int | None = 1024, reuse_port: bool = False,
) -> HttpEndpoint:  # fmt: skip
    """Serve `app` on host:port from the running event loop; returns once it accepts.

    Raises OSError if the address cannot be bound (a taken port is never shared, except
    among the slot's own workers with `reuse_port`: SO_REUSEPORT)."""
    sock = _bind(host, port, backlog, reuse_port)
    config = uvicorn.Config(
        app,
        http=_timed_protocol(read_timeout_s),
        limit_concurrency=max_connections,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_keep_alive=int(keep_alive_s),
        timeout_graceful_shutdown=5,
    )
    server = _EmbeddedServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="v2-rest-listener")
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the V2 REST listener on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    bound = int(sock.getsockname()[1])
    log.info("V2 REST listener on %s:%d (read timeout %gs, at most %s connections)", host, bound, read_timeout_s,
             max_connections)  # fmt: skip
    return HttpEndpoint(server, task, bound)

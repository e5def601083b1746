"""Open Inference Protocol (V2) over gRPC: a thin adapter over the core.

`InferenceServicer` implements the core RPCs of `inference.GRPCInferenceService`
(ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer) with
tritonclient's generated classes; every other RPC (ModelConfig, ModelStreamInfer, ...)
answers UNIMPLEMENTED. `start_grpc_server` runs it, with the standard `grpc.health.v1.Health`
Check, inside the caller's running event loop, on `service.v2.h2_server` (the default: HTTP/2
framed in the loop's own protocol, 2-3x grpc.aio's calls/s inside the Bento) or on `grpc.aio`
(`transport="grpcio"`, which also serves health Watch streams).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb2
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from service.core.errors import INTERNAL_MESSAGE, InferenceError, Unavailable
from service.core.model import ModelCard
from service.core.predlog import RequestTrace
from service.core.request_id import HEADER as REQUEST_ID_KEY
from service.core.request_id import request_id_from
from service.core.tensors import InferRequest, InferResponse
from service.v2 import SERVER_NAME, SERVER_VERSION
from service.v2.grpc_codec import from_model_infer_request, to_model_infer_response, to_model_metadata_response
from service.v2.h2_server import H2GrpcServer, UnaryMethod

log = logging.getLogger("bento_canary.v2.grpc")
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
MODEL_VERSION_KEY = "x-model-version"


class Core(Protocol):
    """The only part of the inference core this adapter uses."""

    card: ModelCard
    ready: bool

    def is_ready(self) -> bool: ...

    @property
    def max_input_elements(self) -> int | None: ...

    def check_model(self, name: str, version: str | None = None) -> None: ...
    async def infer(self, request: InferRequest, trace: RequestTrace | None = None) -> InferResponse: ...


CoreProvider = Callable[[], "Core | None"]
"""Returns the core, or None while the model is still loading (answered UNAVAILABLE)."""


def _mapped(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """The boundary: `InferenceError` -> its gRPC code and safe message, the rest INTERNAL."""

    counted = method.__name__ == "ModelInfer"  # request metrics count inferences only

    @functools.wraps(method)
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, status = time.perf_counter(), "OK"
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            status = "ABORTED"
            raise
        except InferenceError as exc:
            status = exc.grpc_code
            await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        except Exception:
            status = "INTERNAL"
            log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        finally:
            core = self._core_provider() if counted else None
            if core is not None and hasattr(core, "observer"):
                core.observer.request("grpc", status, time.perf_counter() - started)

    return handler


class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    """The V2 gRPC data plane over whatever core `core_provider` returns at call time."""

    def __init__(self, core_provider: CoreProvider) -> None:
        self._core_provider = core_provider

    def _core(self) -> Core:
        core = self._core_provider()
        if core is None:
            raise Unavailable("the model is still loading")
        return core

    @_mapped
    async def ServerLive(self, request: pb2.ServerLiveRequest, context: Any) -> pb2.ServerLiveResponse:
        return pb2.ServerLiveResponse(live=True)

    @_mapped
    async def ServerReady(self, request: pb2.ServerReadyRequest, context: Any) -> pb2.ServerReadyResponse:
        core = self._core_provider()
        return pb2.ServerReadyResponse(ready=bool(core is not None and core.is_ready()))

    @_mapped
    async def ModelReady(self, request: pb2.ModelReadyRequest, context: Any) -> pb2.ModelReadyResponse:
        # An unknown model or version is NOT_FOUND, as on REST (404), not ready=false.
        core = self._core()
        core.check_model(request.name, request.version or None)
        return pb2.ModelReadyResponse(ready=core.is_ready())

    @_mapped
    async def ServerMetadata(self, request: pb2.ServerMetadataRequest, context: Any) -> pb2.ServerMetadataResponse:
        return pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    @_mapped
    async def ModelMetadata(self, request: pb2.ModelMetadataRequest, context: Any) -> pb2.ModelMetadataResponse:
        core = self._core()
        core.check_model(request.name, request.version or None)
        return to_model_metadata_response(core.card)

    @_mapped
    async def ModelInfer(self, request: pb2.ModelInferRequest, context: Any) -> pb2.ModelInferResponse:
        trace = RequestTrace(_request_id(context), "grpc", time.perf_counter())
        # Trailing metadata: it travels with the status, in the same batch of operations (an
        # error's status too). Initial metadata is a separate operation per call and cost ~30%
        # of gRPC throughput (measured: 2,100-2,170 vs 1,300-1,840 calls/s on digits-cnn).
        context.set_trailing_metadata(((REQUEST_ID_KEY, trace.request_id),))
        core = self._core()
        infer_request = from_model_infer_request(request, core.max_input_elements)
        if not infer_request.id:  # V2: the answer's id is the request's, else the request id
            infer_request.id = trace.request_id
        response = await core.infer(infer_request, trace)
        context.set_trailing_metadata(((MODEL_VERSION_KEY, response.model_version), (REQUEST_ID_KEY, trace.request_id)))
        return to_model_infer_response(response)


def _request_id(context: Any) -> str:
    """The call's `x-request-id` metadata (nginx stamps one) when sane, else a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return request_id_from(value)
    return request_id_from(None)


class SlotHealth(health.aio.HealthServicer):
    """`grpc.health.v1.Health` whose Check also follows the whole slot: a SERVING answer
    becomes NOT_SERVING while the core is not ready, e.g. while a sibling worker of a
    multi-worker slot is gone (each worker holds its own health table; the connection reaches
    one of them). Watch streams report the table as set by `GrpcEndpoint.set_serving`."""

    def __init__(self, core_provider: CoreProvider) -> None:
        super().__init__()
        self._core_provider = core_provider

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        response = await super().Check(request, context)
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            core = self._core_provider()
            if core is None or not core.is_ready():
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return response


class _Stoppable(Protocol):
    async def stop(self, grace: float | None) -> Any: ...


class GrpcEndpoint:
    """A running gRPC server: `port` is the bound one (useful after binding port 0)."""

    def __init__(self, server: _Stoppable, port: int, health_servicer: health.aio.HealthServicer) -> None:
        self.server = server
        self.port = port
        self._health = health_servicer

    async def set_serving(self, serving: bool) -> None:
        """Flip grpc.health.v1 for "" and the inference service (Kubernetes gRPC probes)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING for good, then stop; in-flight calls get `grace` seconds."""
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _cannot_bind(address: str, cause: Exception | None = None) -> OSError:
    detail = f" ({cause})" if cause is not None else ""
    return OSError(f"cannot bind the gRPC server to {address}: port taken or address unavailable{detail}")


UNARY_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


def unary_methods(servicer: InferenceServicer, health_servicer: SlotHealth) -> dict[str, UnaryMethod]:
    """The lean server's routing table: the V2 RPCs this adapter implements and health Check;
    any other path (ModelConfig, ModelStreamInfer, health Watch, ...) answers UNIMPLEMENTED."""
    service = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    table = {f"/{SERVICE_NAME}/{name}": UnaryMethod(getattr(servicer, name),
                                                    getattr(pb2, service.methods_by_name[name].input_type.name))
             for name in UNARY_RPCS}  # fmt: skip
    table[HEALTH_CHECK_PATH] = UnaryMethod(health_servicer.Check, health_pb2.HealthCheckRequest)
    return table


async def start_grpc_server(
    core_provider: CoreProvider, host: str, port: int, max_message_bytes: int = 8 << 20,
    max_concurrent_rpcs: int | None = 1024, reuse_port: bool = False, transport: str = "lean",
) -> GrpcEndpoint:  # fmt: skip
    """Start the V2 gRPC server in the running event loop and return its endpoint.

    `transport` "lean" is `service.v2.h2_server` (the default: HTTP/2 framed in the loop's own
    protocol; unary RPCs and health Check), "grpcio" is `grpc.aio` (health Watch too; in the
    Bento 0.4x the calls/s). Same servicers, same limits, same answers.

    `port=0` binds a free port (see `GrpcEndpoint.port`). Messages over `max_message_bytes`
    either way are refused by gRPC with RESOURCE_EXHAUSTED, and so are calls beyond
    `max_concurrent_rpcs` in flight. `reuse_port` lets the slot's worker processes share the
    port (SO_REUSEPORT; the kernel spreads connections over them). Health starts SERVING if the
    core is already ready, NOT_SERVING otherwise (call `set_serving(True)` once it is).
    Raises OSError if the address cannot be bound (e.g. the port is taken).
    """
    servicer, health_servicer = InferenceServicer(core_provider), SlotHealth(core_provider)
    address = _address(host, port)
    if transport == "lean":
        lean = H2GrpcServer(unary_methods(servicer, health_servicer), max_message_bytes, max_concurrent_rpcs)
        try:
            bound = await lean.listen(host, port, reuse_port)
        except OSError as exc:
            raise _cannot_bind(address, exc) from None
        endpoint = GrpcEndpoint(lean, bound, health_servicer)
    elif transport == "grpcio":
        endpoint = _start_grpcio(servicer, health_servicer, address, max_message_bytes, max_concurrent_rpcs, reuse_port)
    else:
        raise ValueError(f"unknown gRPC transport {transport!r} (lean or grpcio)")
    core = core_provider()
    await endpoint.set_serving(core is not None and core.ready)
    if isinstance(endpoint.server, grpc.aio.Server):
        await endpoint.server.start()
    log.info("V2 gRPC server (%s) listening on %s", transport, _address(host, endpoint.port))
    return endpoint


def _start_grpcio(
    servicer: InferenceServicer, health_servicer: SlotHealth, address: str, max_message_bytes: int,
    max_concurrent_rpcs: int | None, reuse_port: bool,
) -> GrpcEndpoint:  # fmt: skip
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpc enables SO_REUSEPORT by default on Linux: a second server on a taken port
        # would then bind "successfully" and silently share traffic with the first one. Only
        # the workers of one slot share a port, on purpose.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises instead of returning 0 in recent versions
        raise _cannot_bind(address, exc) from None
    if not bound:
        raise _cannot_bind(address)
    return GrpcEndpoint(server, bound, health_servicer)

"""Open Inference Protocol (V2) over REST: a thin Starlette adapter over `InferenceCore`.

Every route translates with `service.v2.codec` and delegates; `InferenceError` becomes
`{"error": ...}` with its mapped status, anything else a 500 that hides internals.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core.errors import INTERNAL_MESSAGE, InferenceError, InvalidInput, PayloadTooLarge, Unavailable
from service.core.inference import InferenceCore
from service.v2 import SERVER_EXTENSIONS, SERVER_NAME, SERVER_VERSION
from service.v2.codec import from_request_body, to_response_body

log = logging.getLogger("bento_canary.v2")
HEADER_LENGTH = "Inference-Header-Content-Length"


def _core(request: Request) -> InferenceCore:
    core = getattr(request.app.state, "core", None)
    if core is None:
        raise Unavailable("the model is still loading")
    return core


def _error(exc: Exception) -> JSONResponse:
    if isinstance(exc, InferenceError):
        headers = {"Retry-After": "1"} if isinstance(exc, Unavailable) else None
        return JSONResponse({"error": str(exc)}, status_code=exc.http_status, headers=headers)
    log.exception("internal error in the V2 REST adapter")
    return JSONResponse({"error": INTERNAL_MESSAGE}, status_code=500)


def _versioned(request: Request) -> tuple[str, str | None]:
    return request.path_params["model"], request.path_params.get("version")


async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    core = getattr(request.app.state, "core", None)
    ready = bool(core and core.ready)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)})


def model_metadata_body(core: InferenceCore) -> dict[str, Any]:
    card = core.card
    return {
        "name": card.name,
        "versions": [card.version],
        "platform": card.platform,
        "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in card.inputs],
        "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in card.outputs],
        # Not part of V2; clients ignore unknown fields. The lineage a release engineer checks.
        "parameters": {"sha256": card.sha256, **card.lineage},
    }


async def model_metadata(request: Request) -> Response:
    try:
        core = _core(request)
        core.check_model(*_versioned(request))
        return JSONResponse(model_metadata_body(core), headers={"X-Model-Version": core.card.version})
    except Exception as exc:  # noqa: BLE001 - the boundary maps every error once
        return _error(exc)


async def model_ready(request: Request) -> Response:
    try:
        core = _core(request)
        core.check_model(*_versioned(request))
        return JSONResponse({"name": core.card.name, "ready": core.ready}, status_code=200 if core.ready else 503)
    except Exception as exc:  # noqa: BLE001
        return _error(exc)


async def infer(request: Request) -> Response:
    started = time.perf_counter()
    response = await _infer(request)
    core = getattr(request.app.state, "core", None)
    if core is not None:
        core.observer.request("rest", str(response.status_code), time.perf_counter() - started)
    return response


async def _infer(request: Request) -> Response:
    try:
        core = _core(request)
        limit = request.app.state.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
        body = await request.body()
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        name, version = _versioned(request)
        core.check_model(name, version)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise InvalidInput("compressed request bodies are not supported; send Content-Encoding: identity")
        infer_request = from_request_body(body, request.headers.get(HEADER_LENGTH), name, version)
        response = await core.infer(infer_request)
        content, json_length = to_response_body(response, infer_request.parameters["binary_outputs"])
        headers = {"X-Model-Version": response.model_version}
        if json_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers[HEADER_LENGTH] = str(json_length)
        return Response(content, media_type="application/octet-stream", headers=headers)
    except Exception as exc:  # noqa: BLE001
        return _error(exc)


def build_v2_app(max_body_bytes: int = 8 << 20) -> Starlette:
    """The V2 REST routes; the service binds its core with `app.state.core = core`."""
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route(f"{model}/ready", model_ready, methods=["GET"]),
        Route(f"{versioned}/ready", model_ready, methods=["GET"]),
        Route(f"{model}/infer", infer, methods=["POST"]),
        Route(f"{versioned}/infer", infer, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.core = None
    app.state.max_body_bytes = max_body_bytes
    return app

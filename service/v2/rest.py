"""Open Inference Protocol (V2) over REST: a thin ASGI adapter over `InferenceCore`.

A plain ASGI callable, no framework: the same app is mounted in BentoML's HTTP server
(next to the native API and /metrics) and served on the Bento's own V2 listener
(`service.v2.http_server`), where no middleware stands between the socket and the core.
Measured on a 2-core machine, one worker: this V2 app under BentoML's HTTP stack answered
~620 requests/s; under plain uvicorn ~2,000, so the hot path does not go through BentoML's
stack (see the README's benchmark).

Every route translates with `service.v2.codec` and delegates; `InferenceError` becomes
`{"error": ...}` with its mapped status, anything else a 500 that hides internals.
Inference and feedback answers carry `X-Request-Id` (`service.core.request_id`); an answer's
V2 `id` is the request's own or that request id. `POST .../feedback` (not V2) hands labels to
the `FeedbackDesk` (`service.core.feedback`) on a worker thread: it waits on the log's store.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.core.errors import (
    INTERNAL_MESSAGE,
    InferenceError,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    Unavailable,
)
from service.core.feedback import MAX_BODY_BYTES as FEEDBACK_MAX_BYTES
from service.core.feedback import FeedbackDesk, labels_from
from service.core.inference import InferenceCore
from service.core.predlog import RequestTrace
from service.core.request_id import request_id_from
from service.v2 import SERVER_EXTENSIONS, SERVER_NAME, SERVER_VERSION
from service.v2.codec import dump_json, from_request_body, parse_json, to_response_body

log = logging.getLogger("bento_canary.v2")
HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()
_JSON = b"application/json"
LARGE_BODY_BYTES = 256 << 10  # decoded off the event loop from this size on
_LARGE_DECODES = 2  # large bodies decoded at once
_LARGE_WAITING = 4  # large bodies allowed to wait for a decoder; beyond: 503, as a full queue
_OCTETS = b"application/octet-stream"
_REQUEST_ID = b"x-request-id"
_SHADOW = b"x-canary-shadow"
_FEEDBACK_IN_FLIGHT = 8  # feedback posts waiting on the store at once; beyond: 503

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")


@dataclass
class Reply:
    """One HTTP answer: status, body and headers (lower-case names)."""

    status_code: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: bytes = _JSON

    @classmethod
    def json(cls, payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(status_code, dump_json(payload), headers or {})


class MethodNotAllowed(InferenceError):
    http_status = 405
    grpc_code = "UNIMPLEMENTED"


class ClientGone(InferenceError):
    """The client disconnected before its answer (nginx's 499): nobody reads the reply."""

    http_status = 499
    grpc_code = "CANCELLED"


def _error(exc: Exception) -> Reply:
    """The REST side of the one error mapping."""
    if isinstance(exc, InferenceError):
        headers = {"retry-after": "1"} if isinstance(exc, Unavailable) else None
        return Reply.json({"error": str(exc)}, exc.http_status, headers)
    log.exception("internal error in the V2 REST adapter")
    return Reply.json({"error": INTERNAL_MESSAGE}, 500)


# /v2/models/{model}[/versions/{version}][/ready|/infer|/feedback]
_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer|/feedback)?$"
)


class V2RestApp:
    """The V2 REST routes as one ASGI app; bind the core with `app.core = core` and, with a
    prediction log, the label desk with `app.feedback = desk`."""

    def __init__(
        self, max_body_bytes: int = 8 << 20, core: InferenceCore | None = None,
        feedback: FeedbackDesk | None = None,
    ) -> None:  # fmt: skip
        self.max_body_bytes = max_body_bytes
        self.core = core
        self.feedback = feedback
        self._large_decodes: asyncio.Semaphore | None = None
        self._large_waiting = 0
        self._feedback_in_flight = 0

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        reply = await self.handle(scope, receive)
        headers = [
            (b"content-type", reply.media_type),
            (b"content-length", str(len(reply.body)).encode()),
            *((k.encode(), v.encode()) for k, v in reply.headers.items()),
        ]
        await send({"type": "http.response.start", "status": reply.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def handle(self, scope: Scope, receive: Receive) -> Reply:
        path = _route_path(scope)
        method = scope["method"]
        try:
            if path == "/v2" or path.startswith("/v2/health/"):
                _only(method, "GET")
                return self._server_route(path)
            match = _MODEL_PATH.match(path)
            if match is None:
                raise ModelNotFound(f"no V2 route {path}")
            name, version, action = match["model"], match["version"], match["action"]
            if action == "/infer":
                _only(method, "POST")
                return await self._infer(scope, receive, name, version)
            if action == "/feedback":
                _only(method, "POST")
                return await self._feedback(scope, receive, name, version)
            _only(method, "GET")
            core = self._core()
            core.check_model(name, version)
            if action == "/ready":
                ready = core.is_ready()
                return Reply.json({"name": core.card.name, "ready": ready}, 200 if ready else 503)
            return Reply.json(model_metadata_body(core), headers={"x-model-version": core.card.version})
        except Exception as exc:  # noqa: BLE001 - the boundary maps every error once
            return _error(exc)

    async def _decode(self, body: bytes, length: str | None, name: str, version: str | None, limit: int | None):
        """Small bodies are decoded in place; a large one (parsing holds the loop for up to a
        second) on a worker thread, at most `_LARGE_DECODES` at a time, so health probes, gRPC
        and the batcher keep being served meanwhile. At most `_LARGE_WAITING` more wait for a
        decoder; beyond that the slot sheds with 503 + Retry-After, as its full batch queue
        does, so overload stays explicit and bounded."""
        if len(body) < LARGE_BODY_BYTES:
            return from_request_body(body, length, name, version, limit)
        if self._large_decodes is None:
            self._large_decodes = asyncio.Semaphore(_LARGE_DECODES)
        if self._large_decodes.locked() and self._large_waiting >= _LARGE_WAITING:
            # Shed, as the batch queue does when full: waiting bodies hold memory, and a
            # client told to retry can go to another replica.
            raise Unavailable(f"server is overloaded: {self._large_waiting} large request bodies wait to be decoded")
        self._large_waiting += 1
        try:
            await self._large_decodes.acquire()
        finally:
            self._large_waiting -= 1
        try:
            return await asyncio.to_thread(from_request_body, body, length, name, version, limit)
        finally:
            self._large_decodes.release()

    # -- routes ----------------------------------------------------------------------------
    def _core(self) -> InferenceCore:
        if self.core is None:
            raise Unavailable("the model is still loading")
        return self.core

    def _server_route(self, path: str) -> Reply:
        if path == "/v2":
            return Reply.json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)})
        if path == "/v2/health/live":
            return Reply.json({"live": True})
        if path == "/v2/health/ready":
            ready = bool(self.core is not None and self.core.is_ready())
            return Reply.json({"ready": ready}, 200 if ready else 503)
        raise ModelNotFound(f"no V2 route {path}")

    async def _infer(self, scope: Scope, receive: Receive, name: str, version: str | None) -> Reply:
        started = time.perf_counter()
        headers = _headers(scope)
        # nginx's id (or the client's, when sane); a new one for a direct call without one
        trace = RequestTrace(request_id_from(headers.get(_REQUEST_ID)), "rest", started, headers.get(_SHADOW) == b"1")
        try:
            reply = await self._infer_reply(headers, receive, name, version, trace)
        except Exception as exc:  # noqa: BLE001
            reply = _error(exc)
        reply.headers["x-request-id"] = trace.request_id
        if self.core is not None:
            self.core.observer.request("rest", str(reply.status_code), time.perf_counter() - started)
        return reply

    async def _infer_reply(
        self, headers: dict[bytes, bytes], receive: Receive, name: str, version: str | None, trace: RequestTrace
    ) -> Reply:
        core = self._core()
        declared = headers.get(b"content-length")
        limit = self.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared.decode()} bytes exceeds the {limit}-byte limit")
        body = await _read_body(receive, limit)
        core.check_model(name, version)
        if headers.get(b"content-encoding", b"identity") != b"identity":
            raise InvalidInput("compressed request bodies are not supported; send Content-Encoding: identity")
        length = headers.get(_HEADER_LENGTH_KEY)
        infer_request = await self._decode(
            body, None if length is None else length.decode("latin-1"), name, version, core.max_input_elements
        )
        if not infer_request.id:  # V2: the answer's id is the request's, else the request id
            infer_request.id = trace.request_id
        response = await _while_connected(core.infer(infer_request, trace), receive)
        content, json_length = to_response_body(response, infer_request.parameters["binary_outputs"])
        answer_headers = {"x-model-version": response.model_version}
        if json_length is None:
            return Reply(200, content, answer_headers)
        answer_headers[HEADER_LENGTH.lower()] = str(json_length)
        return Reply(200, content, answer_headers, _OCTETS)

    async def _feedback(self, scope: Scope, receive: Receive, name: str, version: str | None) -> Reply:
        """POST .../feedback: labels for logged predictions (`service.core.feedback`)."""
        headers = _headers(scope)
        request_id = request_id_from(headers.get(_REQUEST_ID))
        try:
            reply = await self._feedback_reply(headers, receive, name, version)
        except Exception as exc:  # noqa: BLE001
            reply = _error(exc)
        reply.headers["x-request-id"] = request_id
        return reply

    async def _feedback_reply(self, headers: dict[bytes, bytes], receive: Receive, name: str,
                              version: str | None) -> Reply:  # fmt: skip
        core = self._core()
        limit = FEEDBACK_MAX_BYTES
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"feedback body of {declared.decode()} bytes exceeds the {limit}-byte limit")
        body = await _read_body(receive, limit)
        core.check_model(name, version)
        desk = self.feedback
        if desk is None:
            raise ModelNotFound("this server keeps no prediction log, so it cannot join labels (feedback is off)")
        scores = core.card.output_spec(core.card.scores_output)
        classes = scores.shape[-1] if scores is not None and scores.shape and scores.shape[-1] > 0 else None
        labels = labels_from(parse_json(body), classes)
        if self._feedback_in_flight >= _FEEDBACK_IN_FLIGHT:
            raise Unavailable(f"server is busy: {self._feedback_in_flight} feedback posts wait on the log store")
        self._feedback_in_flight += 1
        try:
            result = await desk.post(labels)
        finally:
            self._feedback_in_flight -= 1
        return Reply.json(result.to_json())


async def _while_connected(work: Awaitable[T], receive: Receive) -> T:
    """Await `work` unless the client disconnects first: then it is cancelled, so its rows
    leave the batch queue (the batcher gives their room back) and cost no model time."""
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a server that cannot tell us is no disconnect
            return
        gone = True
        if task is not None:
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone or task is None:
            raise
        task.uncancel()
        raise ClientGone("the client disconnected before its answer") from None
    finally:
        watcher.cancel()


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


def _only(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise MethodNotAllowed(f"method {method} is not allowed here; use {allowed}")


def _route_path(scope: Scope) -> str:
    """The path below the mount point (BentoML mounts this app; Starlette sets root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return dict(scope["headers"])


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refused as soon as it grows past `limit` (nothing more is buffered)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_v2_app(max_body_bytes: int = 8 << 20) -> V2RestApp:
    """The V2 REST app; the service binds its core with `app.core = core`."""
    return V2RestApp(max_body_bytes)

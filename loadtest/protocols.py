"""One inference over each protocol, sent, checked and reported to Locust: the part the
gate's users (`loadtest/users.py`) and the load-test users (`loadtest/locustfile.py`) share.

- V2 REST, JSON or binary tensors, and the BentoML native API: `post_infer` through a Locust
  `FastHttpSession` (Locust times and counts it).
- V2 gRPC: `call_grpc` through the raw `inference.GRPCInferenceService` stub; Locust has no
  gRPC client, so the call is reported with `events.request.fire`.

Every answer goes through `loadtest.answers` (a 200 with a wrong body, or from another slot
or model version than the target names, is a failed request). `namer`, when given, renames
the request after the answer: the load-test locustfile names each one by protocol, slot and
model version so Locust's tables and charts split by them.

This module patches gRPC for gevent on import: import it only inside a Locust process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np

from loadtest.answers import judge_grpc, judge_rest
from loadtest.targets import SLOT_HEADER, Target
from loadtest.v2codec import HEADER_LENGTH, Prediction, WrongAnswer, from_rest_answer, to_binary_body, to_json_body

# grpcio's C core must yield to gevent, or one blocked call would stall every user.
# Must run after gevent's monkey-patching (done by importing locust) and before any channel.
grpc_gevent.init_gevent()

V2_PATH = "/v2/models/{model}/infer"
VERSION_HEADER = "x-model-version"  # the V2 REST answer's model version, also on errors
Namer = Callable[[str | None, str | None], str]  # (answering slot, model version) -> request name


def json_request(row: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """V2 REST with the tensor as a JSON list: (body, headers)."""
    return to_json_body(row), {"Content-Type": "application/json"}


def binary_request(row: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """V2 REST with Triton's binary tensor extension (raw FP32 after the JSON header)."""
    body, header_length = to_binary_body(row)
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}


def post_infer(
    session: Any,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    target: Target,
    name: str,
    context: dict[str, Any],
    parse: Callable[[bytes], Prediction] = from_rest_answer,
    namer: Namer | None = None,
) -> tuple[Prediction | None, str]:
    """POST one inference through a Locust HTTP session: (the prediction, or None for a
    failed request, which Locust counted with why; the request's name). The prediction goes
    into the request's `context` (Locust copied ours into its metadata) for listeners such as
    the gate's book."""
    payload: Any = body  # typed str by Locust; geventhttpclient sends bytes as they are
    request = session.post(path, data=payload, headers=headers, name=name, context=context, catch_response=True)
    with request as resp:
        answered_by = resp.headers.get(SLOT_HEADER) if resp.headers else None
        prediction = None
        try:
            content = (resp.content or b"") if resp.status_code == 200 else b""
            prediction = judge_rest(resp.status_code, content, answered_by, target, getattr(resp, "error", None), parse)
        except WrongAnswer as exc:
            resp.failure(str(exc))
        else:
            resp.request_meta["context"].update(predicted=prediction.predicted, confidence=prediction.confidence)
            resp.success()
        if namer is not None:
            version = prediction.model_version if prediction else (resp.headers or {}).get(VERSION_HEADER)
            resp.request_meta["name"] = namer(answered_by, version)
        return prediction, resp.request_meta["name"]


class GrpcFailure(Exception):
    """A failed gRPC call, reported by status code (Locust groups failures by message)."""


def grpc_call(
    stub: Any, request: Any, metadata: tuple[tuple[str, str], ...], timeout_s: float
) -> tuple[Any, str | None]:
    """One ModelInfer call: (the answer, the slot its `x-canary-slot` initial metadata names).
    Raises grpc.RpcError."""
    response, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=timeout_s)
    # The router sends its slot as initial metadata (the answer's HTTP/2 headers).
    return response, dict(call.initial_metadata() or ()).get(SLOT_HEADER.lower())


def grpc_infer(
    stub: Any, request: Any, metadata: tuple[tuple[str, str], ...], timeout_s: float, target: Target
) -> tuple[Prediction, int]:
    """One checked ModelInfer call: (its prediction, the answer's size). Raises grpc.RpcError,
    or WrongAnswer for a malformed answer or one from another slot or model version."""
    response, answered_by = grpc_call(stub, request, metadata, timeout_s)
    return judge_grpc(response, answered_by, target), response.ByteSize()


def call_grpc(
    environment: Any,
    stub: Any,
    request: Any,
    metadata: tuple[tuple[str, str], ...],
    *,
    timeout_s: float,
    target: Target,
    name: str,
    context: dict[str, Any],
    namer: Namer | None = None,
) -> tuple[Prediction | None, str]:
    """One ModelInfer call, checked and reported through Locust's request event: (the
    prediction, or None for a failed call; the request's name)."""
    exception: Exception | None = None
    prediction: Prediction | None = None
    answered_by: str | None = None
    length = 0
    started = time.perf_counter()
    try:
        response, answered_by = grpc_call(stub, request, metadata, timeout_s)
        prediction = judge_grpc(response, answered_by, target)
        length = response.ByteSize()
        context.update(predicted=prediction.predicted, confidence=prediction.confidence)
    except grpc.RpcError as exc:
        exception = GrpcFailure(f"{exc.code().name}: {exc.details()}")
        answered_by = _slot_of_failed_call(exc)
    except WrongAnswer as exc:
        exception = GrpcFailure(str(exc))
    elapsed = time.perf_counter() - started
    if namer is not None:
        name = namer(answered_by, prediction.model_version if prediction else None)
    environment.events.request.fire(
        request_type="grpc", name=name, response_time=elapsed * 1000, response_length=length,
        exception=exception, context=context,
    )  # fmt: skip
    return prediction, name


def _slot_of_failed_call(exc: grpc.RpcError) -> str | None:
    """The router's slot on a failed call (nginx's 503 names the slot it tried), if any."""
    try:
        return dict(exc.initial_metadata() or ()).get(SLOT_HEADER.lower())  # type: ignore[attr-defined]
    except AttributeError:
        return None

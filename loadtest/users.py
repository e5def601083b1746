"""Locust users of the promotion gate: V2 REST JSON, V2 REST binary and V2 gRPC.

Every task takes the next labelled digit of the test split and sends that SAME input to
stable and to the candidate at the same moment (which one is sent first alternates), so both
slots are measured under the same load and their predictions can be compared on identical
inputs. Each request is reported through Locust's request event with its slot,
input id, label and prediction in `context`; `SampleBook.on_request` records it.

This module patches gRPC for gevent on import: import it only inside a Locust process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, constant, task
from locust.contrib.fasthttp import FastHttpSession
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from loadtest.samples import DigitFeed, SampleBook
from loadtest.targets import SLOTS, Target
from loadtest.v2codec import (
    HEADER_LENGTH,
    WrongAnswer,
    from_grpc_answer,
    from_rest_answer,
    to_binary_body,
    to_grpc_request,
    to_json_body,
)

# grpcio's C core must yield to gevent, or one blocked call would stall every user.
# Must run after gevent's monkey-patching (done by importing locust) and before any channel.
grpc_gevent.init_gevent()


@dataclass
class GateContext:
    """What the users share, bound to the Locust environment by the gate's locustfile."""

    stable: Target
    candidate: Target
    feed: DigitFeed
    book: SampleBook
    model: str = "digits"
    timeout_s: float = 10.0

    def target(self, slot: str) -> Target:
        return self.stable if slot == "stable" else self.candidate

    def order(self, pair: int) -> tuple[str, str]:
        return SLOTS if DigitFeed.stable_first(pair) else SLOTS[::-1]


def bind(environment, context: GateContext) -> None:
    environment.canary_gate = context


def gate_context(environment) -> GateContext:
    context = getattr(environment, "canary_gate", None)
    if context is None:
        raise RuntimeError("the gate users need loadtest/gate_locustfile.py (no GateContext bound)")
    return context


class PairedUser(User):
    """Base of the gate users: one task, the same digit to both slots."""

    abstract = True
    protocol = ""
    wait_time = constant(0)  # flat out; the gate locustfile paces users with --gate-user-rate

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.gate = gate_context(environment)

    @task
    def same_digit_to_both_slots(self) -> None:
        pair, row, label = self.gate.feed.next()
        # Both requests in flight at once: each slot always carries the same concurrency.
        # Sent one after the other, a momentarily slow slot would collect the waiting users
        # and the other would idle, turning every hiccup into a large latency difference.
        calls = [gevent.spawn(self.send, slot, pair, row, label) for slot in self.gate.order(pair)]
        try:
            gevent.joinall(calls, raise_error=True)
        finally:
            gevent.killall(calls, block=False)  # the user was stopped: stop its requests too

    def send(self, slot: str, pair: int, row: np.ndarray, label: int) -> None:
        raise NotImplementedError


class RestUser(PairedUser):
    abstract = True
    path = "/v2/models/{model}/infer"

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.sessions = {
            slot: FastHttpSession(
                self.gate.target(slot).rest, environment.events.request, user=self,
                connection_timeout=self.gate.timeout_s, network_timeout=self.gate.timeout_s,
            )
            for slot in SLOTS
        }  # fmt: skip

    def encode(self, row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def send(self, slot: str, pair: int, row: np.ndarray, label: int) -> None:
        body, headers = self.encode(row)
        context = {"slot": slot, "protocol": self.protocol, "pair": pair, "label": label}
        url = self.path.format(model=self.gate.model)
        headers = {**self.gate.target(slot).headers, **headers}
        name = f"{slot} {self.protocol}"
        session = self.sessions[slot]
        payload: Any = body  # typed str by Locust; geventhttpclient sends bytes as they are
        request = session.post(url, data=payload, headers=headers, name=name, context=context, catch_response=True)
        with request as resp:
            if resp.status_code != 200:
                error = getattr(resp, "error", None)
                resp.failure(f"HTTP {resp.status_code}" + (f": {error!r}" if error else ""))
                return
            try:
                prediction = from_rest_answer(resp.content or b"")
            except WrongAnswer as exc:
                resp.failure(f"wrong answer: {exc}")
                return
            # Locust copied our context into the request's metadata: the prediction goes there.
            resp.request_meta["context"].update(predicted=prediction.predicted, confidence=prediction.confidence)
            resp.success()


class RestJsonUser(RestUser):
    """V2 REST with the tensor as a JSON list."""

    protocol = "rest-json"

    def encode(self, row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        return to_json_body(row), {"Content-Type": "application/json"}


class RestBinaryUser(RestUser):
    """V2 REST with Triton's binary tensor extension (raw FP32 after the JSON header)."""

    protocol = "rest-binary"

    def encode(self, row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        body, header_length = to_binary_body(row)
        return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}


class GrpcFailure(Exception):
    """A failed gRPC call, reported by status code (Locust groups failures by message)."""


class GrpcUser(PairedUser):
    """V2 gRPC through the raw `inference.GRPCInferenceService` stub; Locust has no gRPC user,
    so each call is reported with `events.request.fire`."""

    protocol = "grpc"

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.channels = {slot: grpc.insecure_channel(self.gate.target(slot).grpc) for slot in SLOTS}
        self.stubs = {slot: pb2_grpc.GRPCInferenceServiceStub(channel) for slot, channel in self.channels.items()}

    def on_stop(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def send(self, slot: str, pair: int, row: np.ndarray, label: int) -> None:
        context = {"slot": slot, "protocol": self.protocol, "pair": pair, "label": label}
        request = to_grpc_request(row, self.gate.model)
        metadata = self.gate.target(slot).grpc_metadata
        exception: Exception | None = None
        length = 0
        started = time.perf_counter()
        try:
            response = self.stubs[slot].ModelInfer(request, metadata=metadata, timeout=self.gate.timeout_s)
            elapsed = time.perf_counter() - started
            length = response.ByteSize()
            prediction = from_grpc_answer(response)
            context.update(predicted=prediction.predicted, confidence=prediction.confidence)
        except grpc.RpcError as exc:
            elapsed = time.perf_counter() - started
            exception = GrpcFailure(f"{exc.code().name}: {exc.details()}")
        except WrongAnswer as exc:
            exception = GrpcFailure(f"wrong answer: {exc}")
        self.environment.events.request.fire(
            request_type="grpc", name=f"{slot} {self.protocol}", response_time=elapsed * 1000,
            response_length=length, exception=exception, context=context,
        )  # fmt: skip


USER_CLASSES = {"rest-json": RestJsonUser, "rest-binary": RestBinaryUser, "grpc": GrpcUser}

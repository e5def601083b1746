"""Locust users of the promotion gate: V2 REST JSON, V2 REST binary and V2 gRPC.

Every task takes the next labelled digit of the test split and sends that SAME input to
stable and to the candidate at the same moment (which one is sent first alternates), so both
slots are measured under the same load and their predictions can be compared on identical
inputs. Each request is announced to the `SampleBook` before it goes out (so one that never
comes back still counts) and reported through Locust's request event with its slot, input
id, label and prediction in `context`; `SampleBook.on_request` records it.

An answer counts only if it comes from the slot and model version the target names
(`Target.wrong_answerer`): a router that fails a forced request over to the other slot
must not have the gate measure stable as the candidate.

This module patches gRPC for gevent on import: import it only inside a Locust process.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import gevent
import grpc
import numpy as np
from locust import User, constant, task
from locust.contrib.fasthttp import FastHttpSession
from locust.exception import StopUser
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from loadtest.protocols import (
    V2_PATH,
    binary_request,
    call_grpc,
    json_request,
    post_infer,
)
from loadtest.protocols import grpc_infer as checked_grpc_infer
from loadtest.samples import DigitFeed, SampleBook
from loadtest.targets import FORCE_TOKEN_HEADER, ROLES, SLOT_HEADER, Target
from loadtest.v2codec import Prediction, WrongAnswer, from_rest_answer, to_grpc_request, to_json_body

# The users reach the targets directly (FastHttp ignores proxy variables): so do the probes.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class GateContext:
    """What the users share, bound to the Locust environment by the gate's locustfile."""

    stable: Target
    candidate: Target
    feed: DigitFeed
    book: SampleBook
    model: str = "digits"
    timeout_s: float = 10.0
    force_token: str | None = None  # lets forced requests through the router; never logged
    stopping: bool = False  # set when the load stops: no new input may go out

    def target(self, slot: str) -> Target:
        return self.stable if slot == "stable" else self.candidate

    def headers(self, slot: str) -> dict[str, str]:
        """The target's headers, plus the force token when there is one."""
        token = {FORCE_TOKEN_HEADER: self.force_token} if self.force_token else {}
        return {**self.target(slot).headers, **token}

    def metadata(self, slot: str) -> tuple[tuple[str, str], ...]:
        return tuple((k.lower(), v) for k, v in self.headers(slot).items())

    def order(self, pair: int) -> tuple[str, str]:
        return ROLES if DigitFeed.stable_first(pair) else ROLES[::-1]


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
        if self.gate.stopping:
            # Locust checks a user's state before waking it and kills it only afterwards: a user
            # whose wait ended during the stop would send an input only to be killed mid-flight.
            raise StopUser()
        pair, row, label = self.gate.feed.next()
        for slot in ROLES:  # before either is sent: a request killed unstarted is open too
            self.gate.book.begin(slot, self.protocol, pair, label)
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
    path = V2_PATH

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.sessions = {
            slot: FastHttpSession(
                self.gate.target(slot).rest, environment.events.request, user=self,
                connection_timeout=self.gate.timeout_s, network_timeout=self.gate.timeout_s,
            )
            for slot in ROLES
        }  # fmt: skip

    def encode(self, row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def send(self, slot: str, pair: int, row: np.ndarray, label: int) -> None:
        body, headers = self.encode(row)
        context = {"slot": slot, "protocol": self.protocol, "pair": pair, "label": label}
        post_infer(
            self.sessions[slot], self.path.format(model=self.gate.model), body, {**self.gate.headers(slot), **headers},
            target=self.gate.target(slot), name=f"{slot} {self.protocol}", context=context,
        )  # fmt: skip


class RestJsonUser(RestUser):
    """V2 REST with the tensor as a JSON list."""

    protocol = "rest-json"

    def encode(self, row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        return json_request(row)


class RestBinaryUser(RestUser):
    """V2 REST with Triton's binary tensor extension (raw FP32 after the JSON header)."""

    protocol = "rest-binary"

    def encode(self, row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        return binary_request(row)


class GrpcUser(PairedUser):
    """V2 gRPC through the raw `inference.GRPCInferenceService` stub; Locust has no gRPC user,
    so each call is reported with `events.request.fire`."""

    protocol = "grpc"

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.channels = {slot: grpc.insecure_channel(self.gate.target(slot).grpc) for slot in ROLES}
        self.stubs = {slot: pb2_grpc.GRPCInferenceServiceStub(channel) for slot, channel in self.channels.items()}

    def on_stop(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def send(self, slot: str, pair: int, row: np.ndarray, label: int) -> None:
        context = {"slot": slot, "protocol": self.protocol, "pair": pair, "label": label}
        call_grpc(
            self.environment, self.stubs[slot], to_grpc_request(row, self.gate.model), self.gate.metadata(slot),
            timeout_s=self.gate.timeout_s, target=self.gate.target(slot), name=f"{slot} {self.protocol}",
            context=context,
        )  # fmt: skip


def grpc_infer(stub: Any, request: Any, gate: GateContext, slot: str) -> tuple[Prediction, int]:
    """One ModelInfer call: (its prediction, the answer's size). Raises grpc.RpcError, or
    WrongAnswer for a malformed answer or one from another slot or model version."""
    return checked_grpc_infer(stub, request, gate.metadata(slot), gate.timeout_s, gate.target(slot))


def rest_infer(gate: GateContext, slot: str, row: np.ndarray) -> None:
    """One V2 REST JSON inference outside Locust's sessions; raises WrongAnswer or OSError."""
    target = gate.target(slot)
    headers = {**gate.headers(slot), "Content-Type": "application/json"}
    url = f"{target.rest}/v2/models/{gate.model}/infer"
    # `Target` admits http(s) base URLs only, so this cannot open a file.
    request = urllib.request.Request(url, data=to_json_body(row), headers=headers, method="POST")  # noqa: S310
    try:
        with NO_PROXY.open(request, timeout=gate.timeout_s) as answer:
            body, answered_by = answer.read(), answer.headers.get(SLOT_HEADER)
    except urllib.error.HTTPError as exc:
        raise WrongAnswer(f"HTTP {exc.code}") from None
    prediction = from_rest_answer(body)
    if wrong := target.wrong_answerer(answered_by, prediction.model_version):
        raise WrongAnswer(wrong)


def answers_now(gate: GateContext, slot: str, protocol: str, row: np.ndarray) -> str | None:
    """Whether `slot` gives a right answer from the right server right now: None if it does,
    else why not. Sent as the load stops, outside Locust's users and its statistics."""
    try:
        if protocol == "grpc":
            with grpc.insecure_channel(gate.target(slot).grpc) as channel:
                grpc_infer(pb2_grpc.GRPCInferenceServiceStub(channel), to_grpc_request(row, gate.model), gate, slot)
        else:
            rest_infer(gate, slot, row)
    except grpc.RpcError as exc:
        return f"{protocol}: {exc.code().name}: {exc.details()}"
    except (WrongAnswer, OSError, http.client.HTTPException) as exc:
        return f"{protocol}: {exc or type(exc).__name__}"
    return None


USER_CLASSES = {"rest-json": RestJsonUser, "rest-binary": RestBinaryUser, "grpc": GrpcUser}

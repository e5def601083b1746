"""Load the model service with Locust: `locust -f loadtest/locustfile.py --host http://127.0.0.1:8080`.

Four users, one per protocol (weights: `--weights`):

    V2RestJsonUser    rest-json    POST /v2/models/digits/infer, tensor as a JSON list
    V2RestBinaryUser  rest-binary  the same with Triton's binary tensor extension
    V2GrpcUser        grpc         inference.GRPCInferenceService/ModelInfer (--grpc-host)
    NativeUser        native       BentoML's own API, POST /classify {"pixels": [[...]]}

Every request is one labelled digit of the test split with a little noise (no two requests
carry the same bytes) and, where the protocol has the switch, the response cache off: ONNX
Runtime runs on every request, and a load test whose answers come from the cache proves
nothing. No client retries. A request fails unless it is a 200 (gRPC: OK) with a valid
classification (10 finite class scores, a distribution where it should be one, a class and
confidence on the native API) and a model version; with `--expect-slot`/`--expect-version`
also unless that slot and version answered. A wrong prediction is not a failure: it counts
against the accuracy per request name, in the web UI's Accuracy tab, in the table printed
at the end and in `<--csv prefix>_accuracy.csv`.

Each request is named after the protocol, router slot and model version that answered
("rest-json blue v3", `X-Canary-Slot` header / `x-canary-slot` gRPC metadata): Locust's
statistics and failures tables, its CSV and HTML reports split the traffic by slot and
version (its charts show totals). "?" marks what an answer did not say (no `X-Canary-Slot`:
nginx itself did not answer).

Options (each also an environment variable; Locust's --help does not list a locustfile's own):

    --grpc-host HOST:PORT     V2 gRPC address (default: --host's host, port
                              $CANARY_STACK_NGINX_GRPC_PORT or 8081: the local stack's nginx)
    --weights rest-json=1,rest-binary=1,grpc=1,native=1   protocol mix (0 leaves one out)
    --user-rate R             requests per second per user (0 = flat out; default 200)
    --force always|never      send `X-Canary: <mode>` (the router's forcing; the force token
                              comes from $CANARY_GATE_FORCE_TOKEN, never the command line)
    --expect-slot S, --expect-version V    only answers from that slot / model version count

Load shapes (step, spike, soak, knee; `loadtest/shapes.py`): CANARY_SHAPE=knee locust -f ...
Distributed: locust -f loadtest/locustfile.py --master, and --worker --master-host H per worker.
`canary loadtest` (`make loadtest`) runs all of this against the running stack.
Used by the release tests and `make chaos` too (V2RestJsonUser alone).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import grpc
import numpy as np
from flask import request
from locust import LoadTestShape, User, constant, constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpSession
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from loadtest.accuracy import AccuracyBook
from loadtest.answers import NATIVE_PATH, from_native_answer, to_native_body
from loadtest.load_options import (
    DEFAULT_USER_RATE,
    DEFAULT_WEIGHTS,
    LoadSetupError,
    build_target,
    check_options,
)
from loadtest.protocols import V2_PATH, binary_request, call_grpc, json_request, post_infer
from loadtest.samples import DigitFeed
from loadtest.shapes import SHAPE_ENV, SHAPES, CanaryShape, add_shape_arguments
from loadtest.targets import FORCE_TOKEN_ENV, Target, request_name
from loadtest.v2codec import Prediction, to_grpc_request

log = logging.getLogger("canary.loadtest")


@dataclass
class LoadContext:
    """What the users of one Locust process share, built when the load starts (a worker
    gets its master's options only then)."""

    target: Target
    feed: DigitFeed
    accuracy: AccuracyBook
    model: str = "digits"
    timeout_s: float = 10.0

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((key.lower(), value) for key, value in self.target.headers.items())


def load_context(environment: Any) -> LoadContext:
    context = getattr(environment, "canary_load", None)
    if context is None:
        raise RuntimeError("the load has not started: no LoadContext bound (see test_start)")
    return context


class CanaryUser(User):
    """One labelled digit per task over `protocol`; checked, named by who answered, counted
    for accuracy."""

    abstract = True
    protocol = ""
    wait_time = constant_throughput(DEFAULT_USER_RATE)  # replaced by --user-rate at test start

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.load = load_context(environment)

    def name(self, slot: str | None, version: str | None) -> str:
        return request_name(self.protocol, slot, version)

    @task
    def infer(self) -> None:
        _, row, label = self.load.feed.next()
        prediction, name = self.send(row)
        if prediction is not None:
            self.load.accuracy.add(name, label, prediction.predicted)

    def send(self, row: np.ndarray) -> tuple[Prediction | None, str]:
        raise NotImplementedError


class HttpInferUser(CanaryUser):
    abstract = True

    def __init__(self, environment) -> None:
        super().__init__(environment)
        timeout = self.load.timeout_s
        self.session = FastHttpSession(
            self.load.target.rest, environment.events.request, user=self, connection_timeout=timeout,
            network_timeout=timeout,
        )  # fmt: skip

    def post(self, path: str, body: bytes, headers: dict[str, str], **kwargs: Any) -> tuple[Prediction | None, str]:
        target = self.load.target
        return post_infer(
            self.session, path, body, {**target.headers, **headers}, target=target, name=self.name(None, None),
            context={}, namer=self.name, **kwargs,
        )  # fmt: skip


class V2RestJsonUser(HttpInferUser):
    """V2 REST, the tensor as a JSON list."""

    protocol = "rest-json"

    def send(self, row: np.ndarray) -> tuple[Prediction | None, str]:
        return self.post(V2_PATH.format(model=self.load.model), *json_request(row))


class V2RestBinaryUser(HttpInferUser):
    """V2 REST with Triton's binary tensor extension (raw FP32 after a JSON header)."""

    protocol = "rest-binary"

    def send(self, row: np.ndarray) -> tuple[Prediction | None, str]:
        return self.post(V2_PATH.format(model=self.load.model), *binary_request(row))


class NativeUser(HttpInferUser):
    """BentoML's native API: POST /classify {"pixels": [[64 numbers]]}."""

    protocol = "native"

    def send(self, row: np.ndarray) -> tuple[Prediction | None, str]:
        headers = {"Content-Type": "application/json"}
        return self.post(NATIVE_PATH, to_native_body(row), headers, parse=from_native_answer)


class V2GrpcUser(CanaryUser):
    """V2 gRPC through the raw stub, one HTTP/2 connection per user; reported through
    Locust's request event (Locust has no gRPC client)."""

    protocol = "grpc"

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.channel = grpc.insecure_channel(self.load.target.grpc)
        self.stub = pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def send(self, row: np.ndarray) -> tuple[Prediction | None, str]:
        return call_grpc(
            self.environment, self.stub, to_grpc_request(row, self.load.model), self.load.metadata,
            timeout_s=self.load.timeout_s, target=self.load.target, name=self.name(None, None), context={},
            namer=self.name,
        )  # fmt: skip


USER_CLASSES: dict[str, type[CanaryUser]] = {
    "rest-json": V2RestJsonUser, "rest-binary": V2RestBinaryUser, "grpc": V2GrpcUser, "native": NativeUser,
}  # fmt: skip


class SelectedShape(LoadTestShape):
    """The Locust face of the load shape CANARY_SHAPE names (`loadtest/shapes.py`)."""

    abstract = True  # Locust picks up only the concrete class made below

    def __init__(self, shape: CanaryShape) -> None:
        super().__init__()
        self.shape = shape

    def reset_time(self) -> None:
        super().reset_time()
        self.shape.reset()

    def tick(self):
        assert self.runner is not None  # Locust attaches its runner before the first tick
        self.shape.configure(self.runner.environment.parsed_options)
        return self.shape.tick(self.get_run_time(), self.runner)


# Locust runs the one load shape in this namespace: the one CANARY_SHAPE names, if any.
if _shape_name := os.environ.get(SHAPE_ENV, "").strip():
    if _shape_name not in SHAPES:
        sys.stderr.write(f"error: {SHAPE_ENV}={_shape_name!r} is no load shape; choose from {', '.join(SHAPES)}\n")
        sys.exit(1)

    class Shape(SelectedShape):
        abstract = False

        def __init__(self) -> None:
            super().__init__(SHAPES[_shape_name]())


# -- options ---------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    parser.add_argument(
        "--grpc-host", env_var="CANARY_LOADTEST_GRPC_HOST", default="",
        help="V2 gRPC host:port (default: --host's host, port $CANARY_STACK_NGINX_GRPC_PORT or 8081)",
    )  # fmt: skip
    parser.add_argument(
        "--weights", env_var="CANARY_LOADTEST_WEIGHTS", default=DEFAULT_WEIGHTS, include_in_web_ui=False,
        help=f"protocol mix, e.g. rest-json=3,grpc=1 (default {DEFAULT_WEIGHTS}); 0 leaves a protocol out",
    )  # fmt: skip
    parser.add_argument(
        "--user-rate", env_var="CANARY_LOADTEST_USER_RATE", type=float, default=DEFAULT_USER_RATE,
        help=f"requests per second per user (0 = flat out; default {DEFAULT_USER_RATE:g})",
    )  # fmt: skip
    parser.add_argument(
        "--force", env_var="CANARY_LOADTEST_FORCE", default="", choices=["", "always", "never"],
        help="send X-Canary: always|never (the candidate / the stable slot; the token from $" + FORCE_TOKEN_ENV + ")",
    )  # fmt: skip
    parser.add_argument("--expect-slot", env_var="CANARY_LOADTEST_EXPECT_SLOT", default="",
                        help="only answers from this router slot count (X-Canary-Slot)")  # fmt: skip
    parser.add_argument("--expect-version", env_var="CANARY_LOADTEST_EXPECT_VERSION", default="",
                        help="only answers from this model version count")  # fmt: skip
    parser.add_argument("--model", env_var="CANARY_LOADTEST_MODEL", default="digits", help="V2 model name")
    parser.add_argument("--request-timeout", env_var="CANARY_LOADTEST_TIMEOUT", type=float, default=10.0,
                        help="per-request timeout in seconds")  # fmt: skip
    add_shape_arguments(parser)


# -- the run ---------------------------------------------------------------------------------

ACCURACY = AccuracyBook()  # this process's counts (a master's: its workers' merged)
# The labelled test split, loaded on import: before a worker reports ready to its master and
# before --run-time starts counting (scikit-learn takes a second or more).
SPLIT = DigitFeed.test_split()
# The load blocked gevent's loop, whose clock stands still meanwhile: a timer set next
# (Locust's --run-time) would otherwise fire early by as long as the load took.
gevent.get_hub().loop.update_now()


@events.init.add_listener
def on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or options.worker:  # a worker gets its master's options with each spawn
        return
    try:
        weights = check_options(options, environment.host)
    except LoadSetupError as exc:
        log.error("%s", exc)
        sys.exit(1)
    for protocol, user_class in USER_CLASSES.items():
        user_class.weight = weights[protocol]
    environment.user_classes[:] = [u for u in environment.user_classes if u.weight > 0]


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    options = environment.parsed_options
    ACCURACY.drain()  # a new run (the web UI can start several)
    if options is None or options.master:
        return  # the master runs no users
    rate = float(options.user_rate)
    for user_class in USER_CLASSES.values():
        user_class.wait_time = constant_throughput(rate) if rate > 0 else constant(0)
    target = build_target(options, environment.host)
    # a random seed per process: two workers never send the same bytes
    feed = DigitFeed(SPLIT.x, SPLIT.y, seed=int.from_bytes(os.urandom(4), "little"))
    environment.canary_load = LoadContext(target, feed, ACCURACY, options.model, options.request_timeout)


@events.init.add_listener
def add_accuracy_tab(environment, web_ui=None, **_kwargs) -> None:
    """An "Accuracy" tab in the web UI: right answers per request name, beside the statistics."""
    if web_ui is None:
        return
    columns = [("name", "Name"), ("right", "Right"), ("answered", "Answered"), ("accuracy", "Accuracy (%)")]
    web_ui.template_args["extended_tabs"] = [{"title": "Accuracy", "key": "accuracy"}]
    web_ui.template_args["extended_tables"] = [
        {"key": "accuracy", "structure": [{"key": key, "title": title} for key, title in columns]}
    ]

    @web_ui.app.after_request
    def with_accuracy(response):
        if request.path != "/stats/requests" or not response.is_json:
            return response
        rows = [
            {"name": name, "safe_name": name, "right": right, "answered": total, "accuracy": round(100 * share, 2)}
            for name, right, total, share in ACCURACY.rows()
        ]
        response.set_data(json.dumps({**response.json, "extended_stats": [{"key": "accuracy", "data": rows}]}))
        return response


@events.report_to_master.add_listener
def ship_accuracy(client_id, data, **_kwargs) -> None:
    data["canary_accuracy"] = ACCURACY.drain()


@events.worker_report.add_listener
def merge_accuracy(client_id, data, **_kwargs) -> None:
    ACCURACY.merge(data.get("canary_accuracy") or {})


@events.quitting.add_listener
def report_accuracy(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or options.worker or not ACCURACY.rows():
        return
    print(ACCURACY.table(), flush=True)
    if options.csv_prefix:
        ACCURACY.write_csv(Path(f"{options.csv_prefix}_accuracy.csv"))

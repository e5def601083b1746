"""Step 2: the servers under test, each started on free ports and stopped after its runs.

A contender is anything with `name`, `kind` ("project" or "alternative"), `baseline` and a
`serve(model, ctx)` context manager that yields `Served` (its endpoints and root pid).
Extension point for the nginx front (another engineer): write a contender whose `serve`
enters `ProjectBento().serve(...)`, starts nginx in front of the yielded REST URL, yields
nginx's endpoints with the Bento's pid, and sets `kind="project"`, `baseline="bento"`;
add it to `build_contenders`. The report then shows its cost against the direct Bento.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from bench.alternatives import ONNX_PATH_ENV
from bench.live_traffic import (
    LIVE_TRAFFIC_NOTE,
    LOG_AND_DRIFT_NOTE,
    as_shadow_copies,
    closing_notes,
    seed_stable_answers,
)
from bench.payloads import Payload, to_grpc, to_mlflow, to_plain_bentoml, to_v2_binary, to_v2_json
from bench.prepare import PreparedModel
from bench.processes import new_children, own_children, stop_tree
from deploy.process import free_port, serving_home, spawn, venv_bin, wait_http_ok

ALTERNATIVES_DIR = Path(__file__).resolve().parent / "alternatives"
REPO_DIR = Path(__file__).resolve().parents[1]  # where `python -m bench.alternatives...` resolves
START_TIMEOUT_S = 180.0
V2_INFER = "/v2/models/digits/infer"


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "rest-json", "rest-binary" or "grpc"
    target: str  # full URL for REST, host:port for gRPC
    payload: Payload


@dataclass(frozen=True)
class Served:
    endpoints: tuple[Endpoint, ...]
    pid: int  # root of the server's process tree (CPU accounting)
    log: Path
    notes: tuple[str, ...] = ()
    extra_pids: tuple[int, ...] = ()  # more process trees that serve (a proxy in front, the log's store)
    closing_notes: Callable[[], tuple[str, ...]] | None = None  # read after the load (the server's own counts)


@dataclass(frozen=True)
class ServeContext:
    workers: int
    logs: Path
    rows: np.ndarray  # the pixels every request carries
    bentoml_home: Path  # the bench home's shared BentoML store
    extra_env: dict[str, str] = field(default_factory=dict)


class Contender(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def kind(self) -> str: ...  # "project" | "alternative"
    @property
    def baseline(self) -> str | None: ...  # the contender this one fronts (its cost is reported against it)

    def serve(self, model: PreparedModel, ctx: ServeContext) -> AbstractContextManager[Served]: ...


def _workers_override(service_name: str, workers: int) -> dict[str, str]:
    """BentoML's JSON config override: the same worker count for any @bentoml.service."""
    return {"BENTOML_CONFIG_OVERRIDES": json.dumps({"services": {service_name: {"workers": workers}}})}


@contextmanager
def _log_sink(on: bool) -> Iterator[str | None]:
    """With `on`, a throw-away Redis for the Bento's prediction log (its URL); else None."""
    if not on:
        yield None
        return
    from bench.processes import redis_server

    with redis_server() as url:
        yield url


class SkipContender(Exception):
    """This contender does not apply to this model (e.g. no int8 export of it); not a failure."""


@dataclass(frozen=True)
class ProjectBento:
    """This project's Bento via `bentoml serve` (deploy.process.served_bento): V2 REST JSON,
    V2 REST binary and V2 gRPC; service settings left at their defaults. With
    precision="int8" it serves the model's int8 export (`canary export --quantize int8`);
    with prediction_log=True the prediction log and input drift run on every request, and with
    shadow_copies=True too every REST request is a shadow copy that the shadow diff pairs with
    stable's answer (bench/live_traffic.py), so its rows against `bento` are their cost."""

    cache_url: str | None = None
    name: str = "bento"
    label: str = "bento-canary (this project)"
    kind: str = "project"
    baseline: str | None = None
    precision: str = "fp32"
    prediction_log: bool = False
    shadow_copies: bool = True  # with prediction_log: every REST request a shadow copy (the worst case)
    workers: int | None = None  # the slot's worker processes (CANARY_SERVICE_WORKERS); None: the run's

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        from deploy.process import served_bento

        if self.precision == "int8":
            if model.int8 is None:
                why = f"its int8 export was refused: {model.int8_refused}" if model.int8_refused else "none in this run"
                raise SkipContender(f"no int8 export of {model.architecture}: {why}")
            model = model.int8

        grpc_port, rest_port = free_port(), free_port()
        workers = self.workers or ctx.workers
        env = {
            "CANARY_SERVICE_GRPC_PORT": str(grpc_port),
            "CANARY_SERVICE_REST_PORT": str(rest_port),
            "CANARY_SERVICE_WORKERS": str(workers),  # the service's own setting: ports shared when > 1
            **ctx.extra_env,
        }
        if self.cache_url:
            env["CANARY_SERVICE_CACHE_URL"] = self.cache_url
        log = ctx.logs / f"bench-{self.name}{'-cache' if self.cache_url else ''}-{model.architecture}.log"
        rest_json, rest_binary = to_v2_json(ctx.rows), to_v2_binary(ctx.rows)
        before = own_children()
        with _log_sink(self.prediction_log) as sink_url:
            sink_pids = tuple(new_children(before))  # the log's redis-server: its CPU is the log's too
            before = own_children()
            if sink_url:
                env["CANARY_SERVICE_PREDICTION_LOG_URL"] = sink_url
            if sink_url and self.shadow_copies:
                seed_stable_answers(sink_url, "digits", ctx.rows)
                rest_json, rest_binary = as_shadow_copies(rest_json), as_shadow_copies(rest_binary)
            with served_bento(model.bento_tag, free_port(), log, env, timeout=START_TIMEOUT_S) as base:
                pid = new_children(before)[0]
                v2 = f"http://127.0.0.1:{rest_port}"  # the Bento's own V2 listener, as nginx uses it
                yield Served(
                    (
                        Endpoint("rest-json", v2 + V2_INFER, rest_json),
                        Endpoint("rest-binary", v2 + V2_INFER, rest_binary),
                        Endpoint("grpc", f"127.0.0.1:{grpc_port}", to_grpc(ctx.rows)),
                    ),
                    pid,
                    log,
                    (
                        "service settings at their defaults (adaptive batching max_batch_size 64, max_latency_ms 2; "
                        "ONNX Runtime threads = cores / workers)" + (f"; {workers} workers" if self.workers else ""),
                        *((LIVE_TRAFFIC_NOTE if self.shadow_copies else LOG_AND_DRIFT_NOTE,) if sink_url else ()),
                    ),
                    extra_pids=sink_pids,
                    closing_notes=(lambda: closing_notes(base)) if sink_url else None,
                )


@dataclass(frozen=True)
class NginxFrontedBento:
    """The project's Bento behind its own nginx + Lua router (`nginx/nginx.conf.j2`, as the
    local stack runs it): one slot, stable at 100%; its cost is reported against `bento`."""

    name: str = "bento-nginx"
    label: str = "bento-canary behind nginx"
    kind: str = "project"
    baseline: str | None = "bento"

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        from deploy.nginx import (
            NginxController,
            NginxPorts,
            Routing,
            SlotAddress,
            ensure_token,
            render_config,
            write_routing_file,
        )

        with ProjectBento().serve(model, ctx) as direct:
            v2 = _port(direct.endpoints[0].target)
            grpc = int(direct.endpoints[2].target.rsplit(":", 1)[1])
            slot = SlotAddress("blue", "127.0.0.1", v2, grpc, v2)
            prefix = ctx.logs.parent / "bench-nginx" / model.architecture
            prefix.mkdir(parents=True, exist_ok=True)
            token, routing = prefix / "admin.token", prefix / "routing.json"
            ensure_token(token)
            write_routing_file(routing, Routing("blue"), [slot])
            ports = NginxPorts(free_port(), free_port(), free_port())
            controller = NginxController(prefix)
            controller.apply(render_config(controller.prefix, ports, [slot], routing, token, 1), 1)
            try:
                rest = f"http://127.0.0.1:{ports.rest}"
                yield Served(
                    (
                        Endpoint("rest-json", rest + V2_INFER, to_v2_json(ctx.rows)),
                        Endpoint("rest-binary", rest + V2_INFER, to_v2_binary(ctx.rows)),
                        Endpoint("grpc", f"127.0.0.1:{ports.grpc}", to_grpc(ctx.rows)),
                    ),
                    direct.pid,
                    direct.log,
                    ("nginx.conf.j2 as the local stack renders it (worker_processes auto, upstream keep-alive)",),
                    extra_pids=(controller.master_pid(),),
                )
            finally:
                controller.stop()


def _port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


@contextmanager
def _spawned(argv: list[str], ready_url: str, log: Path, env: dict[str, str], cwd: Path | None = None) -> Iterator[int]:
    child = spawn(argv, log, env, cwd)
    try:
        wait_http_ok(child, ready_url, START_TIMEOUT_S)
        yield child.pid
    finally:
        stop_tree(child)


@dataclass(frozen=True)
class PlainBentoML:
    """`@bentoml.api(batchable=True)` with default knobs, `bentoml serve plain_bentoml:PlainDigits`."""

    name: str = "bentoml-plain"
    label: str = "plain BentoML (batchable=True)"
    kind: str = "alternative"
    baseline: str | None = None

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        port = free_port()
        env = {
            "BENTOML_HOME": str(serving_home(ctx.bentoml_home, "bench-plain")),
            ONNX_PATH_ENV: str(model.onnx_path),
            **_workers_override("plain-digits", ctx.workers),
        }
        argv = [venv_bin("bentoml"), "serve", "plain_bentoml:PlainDigits", "--host", "127.0.0.1", "--port", str(port)]
        log = ctx.logs / f"bench-{self.name}-{model.architecture}.log"
        base = f"http://127.0.0.1:{port}"
        with _spawned(argv, base + "/readyz", log, env, cwd=ALTERNATIVES_DIR) as pid:
            yield Served(
                (Endpoint("rest-json", base + "/predict", to_plain_bentoml(ctx.rows)),),
                pid,
                log,
                ("BentoML's default batching knobs and HTTP stack; ONNX Runtime default session options",),
            )


@dataclass(frozen=True)
class HandWrittenFastAPI:
    """FastAPI + uvicorn + ONNX Runtime, one session.run per request, access log off."""

    name: str = "fastapi"
    label: str = "FastAPI + uvicorn + ORT"
    kind: str = "alternative"
    baseline: str | None = None

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        port = free_port()
        argv = [
            sys.executable, "-m", "uvicorn", "--factory", "bench.alternatives.fastapi_app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(ctx.workers), "--no-access-log",
        ]  # fmt: skip
        log = ctx.logs / f"bench-{self.name}-{model.architecture}.log"
        base = f"http://127.0.0.1:{port}"
        with _spawned(argv, base + "/v2/health/ready", log, {ONNX_PATH_ENV: str(model.onnx_path)}, cwd=REPO_DIR) as pid:
            yield Served(
                (Endpoint("rest-json", base + V2_INFER, to_v2_json(ctx.rows)),),
                pid,
                log,
                (
                    "async handler calling session.run inline, pydantic models, ONNX Runtime defaults, "
                    "uvicorn --no-access-log (uvloop / httptools when installed)",
                ),
            )


@dataclass(frozen=True)
class GrpcCeiling:
    """grpcio's own ceiling: a `grpc.aio` server answering a fixed answer (no model, no
    validation), one process; the project's gRPC row is read against it (kind "ceiling": never
    an alternative to beat)."""

    name: str = "grpc-ceiling"
    label: str = "grpc.aio with an empty handler (the library's ceiling)"
    kind: str = "ceiling"
    baseline: str | None = None

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        if model.architecture != "digits-cnn":  # no model runs: one measurement, next to the fast model's rows
            raise SkipContender("the library's ceiling is measured once, with digits-cnn")
        grpc_port, http_port = free_port(), free_port()
        argv = [sys.executable, "-m", "bench.alternatives.grpc_ceiling", str(grpc_port), str(http_port)]
        log = ctx.logs / f"bench-{self.name}-{model.architecture}.log"
        ready = f"http://127.0.0.1:{http_port}/ready"
        with _spawned(argv, ready, log, {ONNX_PATH_ENV: str(model.onnx_path)}, cwd=REPO_DIR) as pid:
            yield Served(
                (Endpoint("grpc", f"127.0.0.1:{grpc_port}", to_grpc(ctx.rows)),),
                pid,
                log,
                ("the project's gRPC server library and servicer class, a handler that only returns an answer",),
            )


@dataclass(frozen=True)
class MlflowServe:
    """`mlflow models serve --env-manager local` of the registered version (the torch pyfunc)."""

    name: str = "mlflow"
    label: str = "mlflow models serve (torch pyfunc)"
    kind: str = "alternative"
    baseline: str | None = None

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        port = free_port()
        argv = [
            venv_bin("mlflow"), "models", "serve", "-m", model.registry_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "-w", str(ctx.workers),
        ]  # fmt: skip
        log = ctx.logs / f"bench-{self.name}-{model.architecture}.log"
        base = f"http://127.0.0.1:{port}"
        # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        with _spawned(argv, base + "/ping", log, {"PATH": path}) as pid:
            yield Served(
                (Endpoint("rest-json", base + "/invocations", to_mlflow(ctx.rows)),),
                pid,
                log,
                ("serves the registered torch model (pyfunc), not the ONNX file",),
            )


def build_contenders(names: tuple[str, ...]) -> list[Contender]:
    """The contenders to run, in order; `names` filters (see config.CONTENDER_NAMES)."""
    from bench.peers import peer_contenders

    every: list[Contender] = [
        ProjectBento(),
        ProjectBento(name="bento-int8", label="bento-canary, int8 export", precision="int8"),
        NginxFrontedBento(),
        ProjectBento(
            name="bento-predlog",
            label="bento-canary, log + drift + shadow diff on",
            baseline="bento",
            prediction_log=True,
        ),  # fmt: skip
        ProjectBento(name="bento-2w", label="bento-canary, 2 workers", baseline="bento", workers=2),
        ProjectBento(
            name="bento-int8-2w",
            label="bento-canary, int8 export, 2 workers",
            baseline="bento-int8",
            precision="int8",
            workers=2,
        ),  # fmt: skip
        PlainBentoML(),
        HandWrittenFastAPI(),
        MlflowServe(),
        *peer_contenders(),  # MLServer, KServe, LitServe: the V2 servers users choose, each in its own venv
        GrpcCeiling(),
    ]
    return [c for c in every if c.name in names]

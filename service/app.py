"""The Bento's composition root: builds the core from settings and mounts the adapters.

Served as `service.app:DigitsService`. The model tag is a Bento argument baked in by
`canary build` (`bentoml serve service.app:DigitsService --arg model_tag=digits:v1`
works from a checkout). The service imports neither torch nor mlflow.

Batching is our own (`service.core.batching`), not BentoML's `batchable=True`: BentoML
batches per `@bentoml.api` method behind its own HTTP stack, so V2 REST, V2 gRPC and the
native API could not share one batcher; and with max_latency_ms 20-50 and 32-64 clients
BentoML 1.4.39 answered a few percent of requests 503 "process is overloaded" while the
CPU was not saturated (measured when this project was planned).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field, SecretStr

from service.core.cache import NullCache, RedisCache, ResponseCache
from service.core.errors import InferenceError, InvalidInput
from service.core.faults import FaultPlan
from service.core.feedback import FeedbackDesk
from service.core.inference import BatchingConfig, InferenceCore
from service.core.model import ModelCard
from service.core.observer import CoreObserver
from service.core.predlog import PredictionLog, RequestTrace
from service.core.request_id import request_id_from
from service.core.runner import OnnxRunner
from service.logs import install_json_logs
from service.predlog_process import LogSpec, ProcessPredictionLog, build_in_thread
from service.settings import ServiceSettings
from service.sinks import PredictionLogStore
from service.v2.rest import build_v2_app
from service.workers import WorkerRoster, resolve_workers, shared_folder

if TYPE_CHECKING:
    from service.v2.grpc_server import GrpcEndpoint
    from service.v2.http_server import HttpEndpoint

log = logging.getLogger("bento_canary.service")
ONNX_FILE = "model.onnx"
TALLY_REFRESH_S = 5.0  # how often each slot re-reads the online accuracy from the log's store


class BentoArgs(BaseModel):
    model_tag: str = "digits:latest"


def to_bentoml_error(exc: InferenceError) -> BentoMLException:
    """The native API's side of the one error mapping: same status as V2 REST."""
    error = BentoMLException(str(exc))
    error.error_code = HTTPStatus(exc.http_status)
    return error


_SETTINGS = ServiceSettings()
# Worker processes of the slot (service.workers): each runs its own batcher and session and
# binds the V2 ports with SO_REUSEPORT when there are several.
WORKERS = resolve_workers(_SETTINGS.workers)
_ARGS = bentoml.use_arguments(BentoArgs)
# Stateless until the service instance binds its core in __init__ (BentoML mounts ASGI
# apps when the class is defined, before any instance exists).
v2_app = build_v2_app(max_body_bytes=_SETTINGS.max_body_bytes)


class Classified(BaseModel):
    model_version: str = Field(description="Registry version of the model that answered.")
    classes: list[int] = Field(description="Predicted digit per row.")
    confidences: list[float] = Field(description="Probability of the predicted digit per row.")


def secret_text(value: SecretStr | None) -> str | None:
    """A secret setting's text; None when unset or empty (an empty env var means "not given")."""
    return (value.get_secret_value() if value else "") or None


def build_cache(settings: ServiceSettings, on_event) -> ResponseCache:
    if not settings.cache_url:
        return NullCache()
    timeout = settings.cache_timeout_ms / 1000
    return RedisCache(
        settings.cache_url,
        password=secret_text(settings.cache_password),
        ttl_seconds=settings.cache_ttl_seconds,
        max_entry_bytes=settings.cache_max_entry_bytes,
        connect_timeout_s=timeout,
        read_timeout_s=timeout,
        on_event=on_event,
    )


def build_prediction_log(
    settings: ServiceSettings, card: ModelCard, observer: CoreObserver, model_folder: Path | None = None
) -> tuple[PredictionLog | None, PredictionLogStore | None]:
    """The prediction log and its store, or (None, None) without `prediction_log_url`; the
    log's writer feeds the input-drift monitor when the model has a reference, and compares
    the shadow copies it logged with stable's answers."""
    if not settings.prediction_log_url:
        return None, None
    spec = LogSpec(
        settings.prediction_log_url, secret_text(settings.prediction_log_password), settings.prediction_log_key,
        settings.prediction_log_cap, settings.prediction_log_label_window_s, settings.prediction_log_timeout_ms / 1000,
        settings.slot, card.name, card.version, settings.prediction_log_buffer, settings.prediction_log_buffer_bytes,
        settings.prediction_log_batch, settings.prediction_log_flush_interval_s, settings.prediction_log_inputs,
        str(model_folder) if model_folder is not None else None, settings.drift_window, settings.json_logs,
        settings.prediction_log_nice,
    )  # fmt: skip
    store = spec.open_store()  # the feedback desk's (the writer, in its process or thread, opens its own)
    predlog = (
        ProcessPredictionLog(spec, observer) if settings.prediction_log_process else build_in_thread(spec, observer)
    )
    return predlog, store


@bentoml.asgi_app(v2_app, path="/")
@bentoml.service(name="digits-service", workers=WORKERS, traffic={"timeout": 30})
class DigitsService:
    model_ref = bentoml.models.BentoModel(_SETTINGS.model_tag or _ARGS.model_tag)

    def __init__(self) -> None:
        from service.metrics import ServiceMetrics  # after BentoML set up multiprocess metrics

        settings = _SETTINGS
        stored = self.model_ref
        card = ModelCard.from_labels(dict(stored.info.labels))
        runner = OnnxRunner(
            Path(stored.path_of(ONNX_FILE)), card, settings.intra_op_threads, WORKERS, settings.intra_op_spinning
        )
        if settings.json_logs:
            install_json_logs(settings.slot, card.name, card.version)
        self.metrics = ServiceMetrics(card, settings.slot)
        self.predlog, store = build_prediction_log(settings, card, self.metrics, Path(stored.path))
        self.core = InferenceCore(
            runner,
            settings.max_rows_per_request,
            batching=BatchingConfig(settings.max_batch_size, settings.max_latency_ms, settings.max_queue_rows),
            cache=build_cache(settings, self.metrics.cache_event),
            cache_secret=(secret_text(settings.cache_hmac_key) or "").encode() or None,
            observer=self.metrics,
            faults=FaultPlan(settings.fault_latency_ms, settings.fault_error_ratio, settings.fault_after_requests),
            predlog=self.predlog,
        )
        # ids not found yet are looked up again for two flush intervals (and half a second)
        settle_s = 2 * settings.prediction_log_flush_interval_s + 0.5
        self.feedback = FeedbackDesk(store, card.name, self.metrics, settle_s=settle_s) if store is not None else None
        self.core.start()
        self.roster = WorkerRoster(shared_folder(), WORKERS)
        self.core.peers_ready = self.roster.all_ready  # the slot is ready when every worker is
        self.grpc: GrpcEndpoint | None = None
        self.rest: HttpEndpoint | None = None
        self._tally_task: asyncio.Task[None] | None = None
        v2_app.core = self.core
        v2_app.feedback = self.feedback
        log.info(
            "serving %s version %s (sha256 %s) in slot %s", card.name, card.version, card.sha256[:12], settings.slot
        )

    @bentoml.on_startup
    async def start_listeners(self) -> None:
        """Serve V2 gRPC (BentoML 1.4 has no gRPC for services) and the V2 REST listener
        from this worker's event loop, so all protocols share its core and batcher."""
        from service.v2.grpc_server import start_grpc_server
        from service.v2.http_server import start_http_server

        s = _SETTINGS
        if self.predlog is not None:
            self.predlog.start()
            log.info("prediction log on: %s (inputs %s)", _redacted(s.prediction_log_url or ""),
                     "logged" if s.prediction_log_inputs else "not logged")  # fmt: skip
        if self.feedback is not None:
            self._tally_task = asyncio.get_running_loop().create_task(_refresh_tallies(self.feedback))
        if s.grpc_port:
            self.grpc = await start_grpc_server(
                lambda: self.core, s.grpc_host, s.grpc_port, s.grpc_max_message_bytes, s.grpc_max_concurrent_rpcs,
                reuse_port=WORKERS > 1, transport=s.grpc_transport,
            )  # fmt: skip
        if s.rest_port:
            self.rest = await start_http_server(
                v2_app, s.rest_host, s.rest_port, read_timeout_s=s.rest_read_timeout_s,
                max_connections=s.rest_max_connections, reuse_port=WORKERS > 1,
            )  # fmt: skip
        self.roster.mark_ready()
        # Everything loaded so far (BentoML, pydantic, grpc, protobuf, the model) lives as long
        # as the process: out of the collector's sight, full collections stop walking it.
        # Measured on digits-cnn gRPC at a fixed load: p50 3.5-3.9 ms vs 5.8-6.0 ms without.
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    async def stop_listeners(self) -> None:
        self.roster.withdraw()
        if self.rest is not None:
            await self.rest.stop(2.0)
        if self.grpc is not None:
            await self.grpc.stop(2.0)
        await self.core.close()
        if self._tally_task is not None:
            self._tally_task.cancel()
        if self.predlog is not None:
            await asyncio.to_thread(self.predlog.close, 2.0)

    def __is_ready__(self) -> bool:
        return self.core.is_ready()

    @bentoml.api
    async def classify(self, pixels: list[list[float]], ctx: bentoml.Context) -> Classified:
        """Classify rows of 64 raw pixel values (0-16, row-major 8x8 images)."""
        started, status = time.perf_counter(), "200"
        headers = ctx.request.headers
        trace = RequestTrace(request_id_from(headers.get("x-request-id")), "bentoml", started,
                             headers.get("x-canary-shadow") == "1")  # fmt: skip
        ctx.response.headers["x-request-id"] = trace.request_id
        try:
            try:
                array = np.asarray(pixels, dtype=np.float32)
            except ValueError:
                raise InvalidInput("pixels must be rows of 64 numbers") from None
            result = await self.core.classify(array, trace)
        except InferenceError as exc:
            status = str(exc.http_status)
            raise to_bentoml_error(exc) from None
        finally:
            self.metrics.request("bentoml", status, time.perf_counter() - started)
        return Classified(model_version=self.core.card.version, classes=result.classes, confidences=result.confidences)


def _redacted(url: str) -> str:
    """`url` without a password, for the log."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


async def _refresh_tallies(desk: FeedbackDesk) -> None:
    """Keep this slot's online-accuracy gauges current with labels any slot stored."""
    while True:
        with contextlib.suppress(Exception):  # the store may be down: the next round tries again
            await asyncio.to_thread(desk.refresh)
        await asyncio.sleep(TALLY_REFRESH_S)

"""`ServiceSettings`: every knob of the serving process, read once from the environment
(prefix `CANARY_SERVICE_`, e.g. `CANARY_SERVICE_GRPC_PORT=50052`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CANARY_SERVICE_", extra="ignore", frozen=True)

    model_tag: str | None = Field(
        default=None,
        description="BentoML model tag to serve; overrides the tag baked into the Bento at build time.",
    )
    slot: str = Field(default="default", description="Release slot name (blue, green...): a metrics and log label.")
    json_logs: bool = Field(default=True, description="One JSON object per log line, with slot and model version.")
    # -- request limits
    max_rows_per_request: int = Field(default=1024, ge=1, description="Rows one request may carry.")
    max_body_bytes: int = Field(default=8 << 20, ge=1024, description="Largest accepted REST request body.")
    # -- worker processes and model runtime
    workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Worker processes of the slot, each with its own batcher, ONNX Runtime session and log "
        "writer, sharing the V2 REST and gRPC ports (SO_REUSEPORT) and aggregating metrics; 0 = one per core "
        "this process may use. The slot is ready when all are.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads per worker; 0 = one per core."
    )
    intra_op_spinning: bool = Field(
        default=False,
        description="Let idle ONNX Runtime threads spin between batches (off: they sleep and leave the "
        "cores to the event loop, which on small models is the bottleneck).",
    )
    # -- adaptive batching (one batcher per worker, shared by REST, gRPC and the native API)
    max_batch_size: int = Field(default=64, ge=1, description="Most rows in one model call.")
    max_latency_ms: float = Field(
        default=2.0, ge=0, description="Longest a request waits for batch companions while the model is free."
    )
    max_queue_rows: int = Field(
        default=4096, ge=1, description="Rows allowed to wait; beyond this requests get 503 / UNAVAILABLE."
    )
    # -- response cache (Redis); off when cache_url is empty
    cache_url: str | None = Field(
        default=None, description="Redis URL of the response cache, e.g. redis://127.0.0.1:6390/0."
    )
    cache_ttl_seconds: int = Field(default=300, ge=1, description="Lifetime of a cached answer.")
    cache_max_entry_bytes: int = Field(default=1 << 20, ge=64, description="Answers larger than this are not cached.")
    cache_timeout_ms: float = Field(default=50.0, gt=0, description="Redis connect and read timeout.")
    cache_password: SecretStr | None = Field(
        default=None, description="Redis AUTH password (the local stack generates one; compose and k8s take it "
        "from a secret). One in cache_url wins.",
    )  # fmt: skip
    cache_hmac_key: SecretStr | None = Field(
        default=None, description="Per-deployment key that signs cache entries (HMAC-SHA256); every slot sharing "
        "the Redis needs the same one. Unset: a random key per process (entries are not shared).",
    )  # fmt: skip
    # -- prediction log (every answered inference, off the hot path) and label feedback
    prediction_log_url: str | None = Field(
        default=None, description="Where the prediction log goes: redis://host:port/db (a capped Stream; the local "
        "stack points it at its Redis) or postgresql://user@host:port/db. Empty: no log, and no feedback.",
    )  # fmt: skip
    prediction_log_password: SecretStr | None = Field(
        default=None, description="Password of the log's Redis or PostgreSQL; one in prediction_log_url wins."
    )
    prediction_log_key: str = Field(
        default="canary:predlog", pattern=r"^[A-Za-z0-9:_.-]{1,64}$", description="Redis key prefix of the log."
    )
    prediction_log_cap: int = Field(
        default=100_000, ge=1, description="Entries the Redis Stream keeps (XADD MAXLEN ~); PostgreSQL keeps all."
    )
    prediction_log_buffer: int = Field(
        default=10_000, ge=1, description="Records waiting for the writer; beyond this they are dropped and counted."
    )
    prediction_log_buffer_bytes: int = Field(
        default=64 << 20,
        ge=1 << 16,
        le=512 << 20,
        description="Input bytes waiting for the writer; beyond, dropped and counted.",
    )
    prediction_log_batch: int = Field(default=500, ge=1, description="Most records in one write to the sink.")
    prediction_log_flush_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often the writer sends what is buffered (sooner when a batch is full).",
    )
    prediction_log_timeout_ms: float = Field(
        default=1000.0, gt=0, description="Connect and call timeout of the sink (the writer's and the feedback's)."
    )
    prediction_log_inputs: bool = Field(
        default=False, description="Also log each request's input (base64 of its little-endian bytes, plus shape "
        "and datatype). Off by default: inputs may be personal data.",
    )  # fmt: skip
    drift_window: int = Field(
        default=1000, ge=10, le=100_000, description="Input rows the input-drift figure is computed on (the last "
        "ones the prediction log's writer saw); published from a fifth of that on. Needs the prediction log.",
    )  # fmt: skip
    prediction_log_label_window_s: int = Field(
        default=86_400, ge=1, description="How long after its answer a prediction can be labelled through feedback."
    )
    prediction_log_nice: int = Field(
        default=5, ge=0, le=19, description="The log writer process's CPU priority below the serving process's "
        "(nice): under saturation requests come first and the writer catches up after.",
    )  # fmt: skip
    prediction_log_process: bool = Field(
        default=True, description="Write the log (rows, input drift, shadow diff) from a process of its own, so its "
        "CPU is not taken from requests under the interpreter lock; off: a thread of the serving process.",
    )  # fmt: skip
    # -- the Bento's own V2 REST listener (the hot path; BentoML's port keeps the native API)
    rest_port: int = Field(
        default=8000, ge=0, le=65535, description="V2 REST port outside BentoML's HTTP stack (Triton's 8000); 0 = off."
    )
    rest_host: str = Field(
        default="127.0.0.1", description="Address the V2 REST listener binds (0.0.0.0 in containers)."
    )
    rest_read_timeout_s: float = Field(
        default=10.0, gt=0, description="A request's head and body must arrive within this; idle or trickling "
        "connections are closed.",
    )  # fmt: skip
    rest_max_connections: int = Field(
        default=1024, ge=1, description="Connections plus in-flight requests on the V2 listener; 503 beyond."
    )
    # -- V2 gRPC server inside the Bento
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="V2 gRPC port; 0 turns gRPC off.")
    grpc_host: str = Field(default="127.0.0.1", description="Address the gRPC server binds (0.0.0.0 in containers).")
    grpc_max_message_bytes: int = Field(
        default=8 << 20, ge=1 << 16, description="Largest gRPC message either way (as the REST body limit)."
    )
    grpc_max_concurrent_rpcs: int = Field(
        default=1024, ge=1, description="Calls in flight on the gRPC server; RESOURCE_EXHAUSTED beyond."
    )
    grpc_transport: Literal["lean", "grpcio"] = Field(
        default="lean",
        description="gRPC server: 'lean' (the default: HTTP/2 framed in the worker's event loop, unary RPCs and "
        "health Check; 2-3x grpc.aio's calls/s inside the Bento: README, Benchmark) or 'grpcio' (grpc.aio; "
        "health Watch streams too).",
    )

    # -- fault injection (tests and chaos drills only; settable only here, at start)
    fault_latency_ms: float = Field(default=0.0, ge=0, description="Extra time per model batch (a slower model).")
    fault_error_ratio: float = Field(
        default=0.0, ge=0, le=1, description="Share of requests failed with 500, on a counted schedule (evenly spread)."
    )
    fault_after_requests: int = Field(
        default=0, ge=0, description="Requests answered normally before injected errors start (e.g. the smoke test)."
    )

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServiceSettings:
        if self.max_queue_rows < max(self.max_batch_size, self.max_rows_per_request):
            raise ValueError("max_queue_rows must be at least max_batch_size and max_rows_per_request")
        return self

"""The prediction log: every answered inference, recorded off the hot path.

The adapters hand each answer to `PredictionLog.offer` (a few hundred nanoseconds: one
object, one append under a lock). A bounded buffer holds it; when the buffer is full the
record is dropped and counted, never waited for. A writer thread drains the buffer every
`flush_interval_s` (sooner once a batch is ready), turns records into rows (`to_row`: the
input's sha256 and, if asked, its bytes are computed there, not on the request's path) and
writes them in batches to a `PredictionSink`. A sink that fails or hangs costs the rows of
that batch (counted as dropped, reason "sink") and one warning per `warn_interval_s`;
requests never see it.

A row (the documented record; `service/sinks/` store it, `canary predictions` exports it):

| field | type | meaning |
|---|---|---|
| request_id | str | the request id (`X-Request-Id`): the key labels are joined on |
| time | float | when the answer was ready, Unix seconds (UTC) |
| slot, model, model_version | str | who answered |
| protocol | str | rest, grpc or bentoml (the native API) |
| shadow | bool | a mirrored copy (nginx's `X-Canary-Shadow: 1`): its client never saw this answer |
| rows | int | rows in the request |
| classes | list[int] | predicted class per row |
| confidences | list[float] | probability of the predicted class per row |
| latency_ms | float | from the adapter receiving the request to the answer being ready |
| input_datatype | str | the V2 datatype of the model's input (FP32 for the digits models) |
| input_shape | list[int] | its shape, e.g. [1, 64] |
| input_sha256 | str | hex SHA-256 of the input's bytes: little-endian, row-major (what input_b64 holds) |
| input_b64 | str or None | those bytes in base64, only with `prediction_log_inputs` on (off by default) |

To read an input back: `row_inputs(row)` (that is, `np.frombuffer(base64.b64decode(row["input_b64"]),
"<f4").reshape(row["input_shape"])`; `<f4` for FP32, `service.core.tensors.V2_TO_NUMPY` maps every
datatype). Models with several inputs log the first one.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.core.observer import CoreObserver

log = logging.getLogger("bento_canary.predlog")
RECORD_OVERHEAD_BYTES = 400  # what a buffered record costs besides its input array (measured: ~350)


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """What an adapter knows about a request that the core does not."""

    request_id: str
    protocol: str  # rest, grpc, bentoml
    started: float  # time.perf_counter() when the adapter got the request
    shadow: bool = False


@dataclass(slots=True)
class Prediction:
    """One answered request as the hot path hands it over: no hashing, no copying."""

    request_id: str
    time: float  # Unix seconds
    protocol: str
    shadow: bool
    latency_s: float
    inputs: np.ndarray  # the validated input (not copied: nothing writes to it afterwards)
    datatype: str
    classes: list[int]
    confidences: list[float]


@dataclass(frozen=True)
class LogIdentity:
    """Who writes the log: the same for every record of a process."""

    slot: str
    model: str
    model_version: str


class PredictionSink(Protocol):
    """Where rows go. `write` runs on the writer thread only; raising drops that batch."""

    def write(self, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def input_bytes(array: np.ndarray) -> bytes | memoryview:
    """The input as little-endian, row-major bytes (a view when it is already so)."""
    little = array.dtype.newbyteorder("<")
    contiguous = np.ascontiguousarray(array, dtype=little)
    return memoryview(contiguous.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # (cast refuses empty arrays)


ROW_FIELDS = (
    "request_id",
    "time",
    "slot",
    "model",
    "model_version",
    "protocol",
    "shadow",
    "rows",
    "classes",
    "confidences",
    "latency_ms",
    "input_datatype",
    "input_shape",
    "input_sha256",
    "input_b64",
)  # fmt: skip  (the keys of `to_row`, in its order: the sinks' columns)


def to_row(p: Prediction, who: LogIdentity, keep_inputs: bool) -> dict[str, Any]:
    """The documented row of one prediction (see the module docstring)."""
    data = input_bytes(p.inputs)
    return {
        "request_id": p.request_id,
        "time": p.time,
        "slot": who.slot,
        "model": who.model,
        "model_version": who.model_version,
        "protocol": p.protocol,
        "shadow": p.shadow,
        "rows": int(p.inputs.shape[0]) if p.inputs.ndim else 1,
        "classes": p.classes,
        "confidences": p.confidences,
        "latency_ms": round(p.latency_s * 1000, 3),
        "input_datatype": p.datatype,
        "input_shape": list(p.inputs.shape),
        "input_sha256": hashlib.sha256(data).hexdigest(),
        "input_b64": base64.b64encode(data).decode("ascii") if keep_inputs else None,
    }


class UnreadableInput(ValueError):
    """A row's logged input does not decode to its recorded datatype, shape and sha256."""


def row_inputs(row: dict[str, Any]) -> np.ndarray | None:
    """The input a row logged (the inverse of `to_row`), None when the log kept no inputs.
    Raises UnreadableInput for bytes that do not match the row's datatype, shape or sha256."""
    from service.core.tensors import V2_TO_NUMPY

    encoded = row.get("input_b64")
    if not encoded:
        return None
    dtype = V2_TO_NUMPY.get(row.get("input_datatype") or "")
    if dtype is None:
        raise UnreadableInput(f"unknown input datatype {row.get('input_datatype')!r}")
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise UnreadableInput("input_b64 is not base64") from None
    if row.get("input_sha256") and hashlib.sha256(data).hexdigest() != row["input_sha256"]:
        raise UnreadableInput("the input's bytes do not match its sha256")
    shape = [int(n) for n in row.get("input_shape") or ()]
    if any(n < 0 for n in shape) or len(data) != dtype.itemsize * int(np.prod(shape)):
        raise UnreadableInput(f"{len(data)} bytes do not make a {row.get('input_datatype')} tensor of shape {shape}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class PredictionLog:
    """Bounded buffer + writer thread. `offer` never blocks or raises; `close` drains.

    Bounds: `max_records` records and `max_bytes` of buffered inputs (each record counts its
    input's bytes plus `RECORD_OVERHEAD_BYTES`), so a burst of large requests while the sink
    is down cannot grow the process. The observer hears `prediction_log(written, dropped,
    buffered)` once per writer cycle, from the writer thread.
    """

    def __init__(
        self,
        sink: PredictionSink,
        who: LogIdentity,
        *,
        max_records: int = 10_000,
        max_bytes: int = 64 << 20,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        keep_inputs: bool = False,
        observer: CoreObserver | None = None,
        warn_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_inputs: Callable[[list[np.ndarray]], None] | None = None,
        on_written: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        if max_records < 1 or max_bytes < 1 or batch_size < 1 or flush_interval_s <= 0:
            raise ValueError("max_records, max_bytes and batch_size must be >= 1, flush_interval_s > 0")
        self.sink, self.who = sink, who
        self.max_records, self.max_bytes, self.batch_size = max_records, max_bytes, batch_size
        self.flush_interval_s, self.keep_inputs = flush_interval_s, keep_inputs
        self.observer = observer or CoreObserver()
        self.warn_interval_s, self._clock = warn_interval_s, clock
        self.on_inputs = on_inputs  # the writer hands each batch's inputs over (input drift)
        self.on_written = on_written  # and after each cycle the rows it wrote (the shadow diff)
        self._buffer: collections.deque[Prediction] = collections.deque()
        self._bytes = 0
        self._overflow = 0  # dropped at offer() since the writer last reported
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_warning = float("-inf")
        self.written = 0  # totals, for tests and the close() log line
        self.dropped: collections.Counter[str] = collections.Counter()

    # -- the hot path ------------------------------------------------------------------
    def offer(self, prediction: Prediction) -> bool:
        """Buffer `prediction`; False (and counted) when the buffer is full."""
        weight = prediction.inputs.nbytes + RECORD_OVERHEAD_BYTES
        with self._lock:
            if len(self._buffer) >= self.max_records or self._bytes + weight > self.max_bytes or self._stopping:
                self._overflow += 1
                return False
            self._buffer.append(prediction)
            self._bytes += weight
            ready = len(self._buffer) == self.batch_size
        if ready:
            self._wake.set()
        return True

    # -- the writer thread -------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records, write what is buffered (within `timeout_s`), stop the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001 - closing must not fail a shutdown
            log.debug("closing the prediction log sink failed", exc_info=True)
        log.info("prediction log closed: %d written, dropped %s", self.written, dict(self.dropped) or "none")

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            self._drain(until_empty=stopping)
            if stopping:
                return

    def _take(self) -> list[Prediction]:
        with self._lock:
            count = min(self.batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(count)]
            self._bytes -= sum(p.inputs.nbytes + RECORD_OVERHEAD_BYTES for p in batch)
        return batch

    def _drain(self, until_empty: bool = False) -> None:
        """Write full batches while there are any, then whatever is left; a sink failure
        ends the cycle (the next one tries again) so a dead sink is asked once per interval."""
        written, failed = 0, 0
        done: list[dict[str, Any]] = []
        while batch := self._take():
            self._hand_inputs(batch)
            try:
                rows = [to_row(p, self.who, self.keep_inputs) for p in batch]
                self.sink.write(rows)
                written += len(batch)
                done += rows
            except Exception as exc:  # noqa: BLE001 - the log is best effort, never a request's problem
                failed += len(batch)
                self._warn(f"prediction log sink failing ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
                if not until_empty:
                    break
            if len(batch) < self.batch_size:
                break
        self._report(written, failed)
        if self.on_written is not None:
            try:
                self.on_written(done)
            except Exception as exc:  # noqa: BLE001 - the shadow diff is a figure, never the log's problem
                self._warn(
                    f"comparing shadow answers failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                    "the copies wait, then count as unmatched (canary_shadow_unmatched_total)",
                )

    def _hand_inputs(self, batch: list[Prediction]) -> None:
        if self.on_inputs is None:
            return
        try:
            self.on_inputs([p.inputs for p in batch])
        except Exception:  # noqa: BLE001 - drift is a figure, never the log's or a request's problem
            log.exception("computing input drift failed")

    def _report(self, written: int, failed: int) -> None:
        with self._lock:
            overflow, self._overflow = self._overflow, 0
            buffered = self._buffered()
        if overflow:
            self._warn(f"prediction log buffer full ({self.max_records} records / {self.max_bytes} bytes)")
        self.written += written
        dropped = {reason: n for reason, n in (("buffer_full", overflow), ("sink", failed)) if n}
        self.dropped.update(dropped)
        try:
            self.observer.prediction_log(written, dropped, buffered)
        except Exception:  # noqa: BLE001 - metrics must never stop the writer
            log.exception("reporting prediction log counts failed")

    def _buffered(self) -> int:
        """Records still waiting to be written (under `_lock`)."""
        return len(self._buffer)

    def _warn(
        self, message: str, then: str = "records are dropped and counted (canary_prediction_log_dropped_total)"
    ) -> None:
        now = self._clock()
        if now - self._last_warning >= self.warn_interval_s:
            self._last_warning = now
            log.warning("%s; %s", message, then)

"""The prediction log's writer in a process of its own: the serving process keeps only the
buffer and the packing.

Why: in the serving process the writer thread (rows, sha256, input drift, the Redis write,
the shadow diff: ~20 us of CPU a row) holds the interpreter lock the event loop needs; at
saturation it took more throughput than its CPU share (`make bench`, bento-predlog). Here the
serving process's writer thread packs each batch into one frame (`service.core.predlog_wire`)
and writes it to the pipe of a child process, `python -m service.predlog_process`, which runs
the in-thread log (`PredictionLog` with its store, drift monitor and shadow comparer) exactly
as the serving process used to, on another core. What the child's log reports (rows written
and dropped, input drift, shadow tallies) comes back as one JSON line per event on its stdout;
a reader thread hands it to the serving process's observer, so `/metrics` is unchanged.

Faults: a child that dies is started again (at most once per `restart_interval_s`); the batch
that met the dead pipe and whatever reaches the pipe before the new child is up are dropped
and counted (reason "sink"), as a failing store's are. A child that takes no frame for
`hang_timeout_s` is killed and replaced the same way; meanwhile only the serving process's
writer thread waits on it, the buffer fills and records are dropped and counted (buffer_full),
never waited for. A replaced writer starts afresh: the drift figure
waits for its window to fill again and shadow copies the old one held unpaired are neither
compared nor counted. The child reads its settings, the store's password among
them, from its stdin, not from its command line or environment; it exits when its stdin
closes (the serving process stopped or died), after writing what it holds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from service.core.observer import CoreObserver
from service.core.predlog import LogIdentity, PredictionLog, PredictionSink
from service.core.predlog_wire import HEADER, MAX_FRAME, pack, unpack
from service.core.shadow_compare import ShadowTally
from service.sinks import PredictionLogStore, open_store

log = logging.getLogger("bento_canary.predlog")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding `service/`


@dataclass(frozen=True)
class LogSpec:
    """Everything a prediction log is built from (the serving settings' prediction_log_*)."""

    url: str
    password: str | None = field(repr=False)
    key_prefix: str
    max_len: int
    label_window_s: int
    timeout_s: float
    slot: str
    model: str
    model_version: str
    max_records: int
    max_bytes: int
    batch_size: int
    flush_interval_s: float
    keep_inputs: bool
    model_folder: str | None = None  # where the drift reference is, if the model has one
    drift_window: int = 1000
    json_logs: bool = False  # the writer process logs as the slot does
    nice: int = 5  # the writer's CPU priority below the serving process's (0: the same)

    def open_store(self) -> PredictionLogStore:
        return open_store(
            self.url, password=self.password, max_len=self.max_len, label_window_s=self.label_window_s,
            timeout_s=self.timeout_s, key_prefix=self.key_prefix,
        )  # fmt: skip

    def log_options(self) -> dict[str, Any]:
        return {
            "max_records": self.max_records, "max_bytes": self.max_bytes, "batch_size": self.batch_size,
            "flush_interval_s": self.flush_interval_s, "keep_inputs": self.keep_inputs,
        }  # fmt: skip


def build_in_thread(spec: LogSpec, observer: CoreObserver) -> PredictionLog:
    """The log with its writer as a thread of this process: store, drift monitor (when the
    model has a reference) and shadow comparer."""
    from service.core.drift import DriftMonitor, DriftReference
    from service.core.shadow_compare import ShadowComparer

    store = spec.open_store()
    reference = DriftReference.load(Path(spec.model_folder)) if spec.model_folder else None
    drift = DriftMonitor(reference, spec.drift_window, max(1, spec.drift_window // 5), observer) if reference else None
    return PredictionLog(
        store, LogIdentity(spec.slot, spec.model, spec.model_version), observer=observer,
        on_inputs=drift.update if drift is not None else None,
        on_written=ShadowComparer(store, spec.model, observer).after_cycle, **spec.log_options(),
    )  # fmt: skip


class _Child:
    """One writer process and the thread relaying its reports. `shipped` counts the records
    sent to it, `accounted` those its reports said were written or dropped: when it ends,
    the difference was lost with it (counted by the parent as dropped, reason "sink")."""

    def __init__(self, spec: LogSpec, on_report) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.predlog_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=_PACKAGE_ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None  # noqa: S101 - PIPE given
        self.stdin: IO[bytes] = self.proc.stdin
        self._fd = self.stdin.fileno()
        os.set_blocking(self._fd, False)  # frames are written with os.write, never through the buffer
        self.shipped = self.accounted = self.buffered = 0  # buffered: its log's backlog, last reported
        self.closed = False
        self.send(orjson.dumps(dataclasses.asdict(spec)))
        self.reader = threading.Thread(
            target=self._relay, args=(self.proc.stdout, on_report), name="prediction-log-reports", daemon=True
        )
        self.reader.start()

    def send(self, frame: bytes, timeout_s: float = 10.0) -> None:
        """One frame. OSError when the child is gone; TimeoutError (after killing it) when it
        takes none of the frame for `timeout_s`: a hung writer is replaced, not waited for."""
        data = memoryview(len(frame).to_bytes(4, "little") + frame)
        while data:
            _, writable, _ = select.select([], [self._fd], [], timeout_s)
            if not writable:
                self.proc.kill()
                raise TimeoutError(f"the writer process took nothing for {timeout_s:g}s; killed")
            data = data[os.write(self._fd, data) :]

    def _relay(self, stdout: IO[bytes], on_report) -> None:
        for line in stdout:
            try:
                report = orjson.loads(line)
                if report[0] == "log":
                    self.accounted += report[1] + sum(report[2].values())
                    self.buffered = report[3]
                on_report(report)
            except Exception:  # noqa: BLE001 - a report is a figure; the relay must go on
                log.exception("prediction log writer report not understood: %r", line[:200])

    def close(self, timeout_s: float) -> int:
        """Close its stdin (it writes what it holds, then exits); killed after `timeout_s`.
        Returns how many records it took and never accounted for (0 when closed before)."""
        if self.closed:
            return 0
        self.closed = True
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5.0)
        return max(0, self.shipped - self.accounted)


class _NoSink:
    """The parent's log writes nothing itself: its batches go to the child."""

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise RuntimeError("the process log ships batches, it writes no rows")

    def close(self) -> None:
        pass


class ProcessPredictionLog(PredictionLog):
    """`PredictionLog` (same buffer, same `offer`, same counts) whose writer thread ships each
    batch to a child process that logs it (see the module docstring)."""

    def __init__(
        self, spec: LogSpec, observer: CoreObserver | None = None, *, restart_interval_s: float = 5.0,
        hang_timeout_s: float = 10.0, warn_interval_s: float = 60.0,
    ) -> None:  # fmt: skip
        sink: PredictionSink = _NoSink()
        who = LogIdentity(spec.slot, spec.model, spec.model_version)
        super().__init__(sink, who, observer=observer, warn_interval_s=warn_interval_s, **spec.log_options())
        self.spec, self.restart_interval_s, self.hang_timeout_s = spec, restart_interval_s, hang_timeout_s
        if spec.model_folder:  # a bad reference fails the start here, as the in-thread log's does
            from service.core.drift import DriftReference

            DriftReference.load(Path(spec.model_folder))
        self._child: _Child | None = None
        self._started_at = float("-inf")
        self._counts_lock = threading.Lock()
        self._children = 0  # writer processes started

    @property
    def restarts(self) -> int:
        """Writer processes started after the first (each replaced one that died or hung)."""
        return max(0, self._children - 1)

    @property
    def child_pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    def start(self) -> None:
        self._ensure_child()
        super().start()

    def _ensure_child(self) -> _Child | None:
        """The running writer process; a dead one is accounted for and replaced (at most once
        per `restart_interval_s`, and never once the log is closing)."""
        child = self._child
        if child is not None and child.proc.poll() is None:
            return child
        if child is not None:
            self._warn(f"prediction log writer process exited (code {child.proc.returncode})",
                       "starting another; records meanwhile are dropped and counted")  # fmt: skip
            self._lost(child.close(0.0))
            self._child = None
        now = time.monotonic()
        if self._stopping or now - self._started_at < self.restart_interval_s:
            return None
        self._started_at = now
        try:
            self._child = _Child(self.spec, self._on_report)
        except OSError as exc:
            self._warn(f"prediction log writer process did not start ({exc})")
            return None
        self._children += 1
        return self._child

    def _drain(self, until_empty: bool = False) -> None:
        failed = 0
        while batch := self._take():
            child = self._ensure_child()
            try:
                if child is None:
                    raise OSError("no writer process")
                child.send(pack(batch), self.hang_timeout_s)
                child.shipped += len(batch)
            except Exception as exc:  # noqa: BLE001 - a dead or hung child, or a batch that cannot travel
                failed += len(batch)
                self._warn(f"prediction log writer process unreachable ({type(exc).__name__}: {exc})")
                if not until_empty:
                    break
            if len(batch) < self.batch_size:
                break
        self._report(0, failed)  # the rows written are reported by the child, as it writes them

    def _on_report(self, report: list[Any]) -> None:
        kind, *values = report
        if kind == "log":
            written, dropped, buffered = values
            with self._counts_lock:
                self.written += written
                self.dropped.update(dropped)
            self.observer.prediction_log(written, dropped, buffered + len(self._buffer))  # (the child's + ours)
        elif kind == "drift":
            self.observer.input_drift(*values)
        elif kind == "shadow":
            self.observer.shadow_compared([ShadowTally(*fields) for fields in values[0]])
        elif kind == "unmatched":
            self.observer.shadow_unmatched(values[0])

    def _lost(self, records: int) -> None:
        """Records a writer process took and ended without writing: dropped, reason sink."""
        if records:
            with self._counts_lock:
                self.dropped["sink"] += records
            self.observer.prediction_log(0, {"sink": records}, len(self._buffer))

    def _report(self, written: int, failed: int) -> None:
        with self._counts_lock:
            super()._report(written, failed)

    def _buffered(self) -> int:
        child = self._child
        return len(self._buffer) + (child.buffered if child is not None else 0)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records and ship what is buffered; a writer process that does not take
        it within `timeout_s` is killed. Then the writer process writes what it holds and exits
        (killed after another `timeout_s`); what it took unwritten is counted as dropped."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive() and self._child is not None:  # blocked on a writer that takes nothing
                self._child.proc.kill()
                thread.join(timeout_s)
        child = self._child
        if child is not None and not (thread is not None and thread.is_alive()):
            self._lost(child.close(timeout_s))  # (only once our thread is done with its pipe)
        elif child is not None:
            child.proc.kill()
        log.info("prediction log writer process stopped: %d written, dropped %s", self.written,
                 dict(self.dropped) or "none")  # fmt: skip


class _Relay(CoreObserver):
    """The child's observer: each report one JSON line on stdout, for the parent's relay."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out, self._lock = out, threading.Lock()

    def _say(self, *report: Any) -> None:
        line = orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def prediction_log(self, written: int, dropped: dict[str, int], buffered: int) -> None:
        self._say("log", written, dropped, buffered)

    def input_drift(self, psi: float, rows: int) -> None:
        self._say("drift", psi, rows)

    def shadow_compared(self, tallies: list[ShadowTally]) -> None:
        self._say("shadow", [dataclasses.astuple(t) for t in tallies])

    def shadow_unmatched(self, copies: int) -> None:
        self._say("unmatched", copies)


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "little")
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    frame = stream.read(size)
    return frame if len(frame) == size else None


def main() -> int:
    """The child: settings, then one frame per batch on stdin until it closes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s (log writer): %(message)s")
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")  # the reports' own descriptor: nothing else writes to it
    os.dup2(2, 1)  # whatever else writes to fd 1 (print, a C library) goes to stderr
    sys.stdout = sys.stderr
    first = _read_frame(stdin)
    if first is None:
        return 0
    spec = LogSpec(**orjson.loads(first))
    if spec.nice > 0:
        os.nice(spec.nice)  # background work: under saturation requests come first, the log falls behind
    if spec.json_logs:
        from service.logs import install_json_logs

        install_json_logs(spec.slot, spec.model, spec.model_version)
    predlog = build_in_thread(spec, _Relay(stdout))
    predlog.start()
    try:
        while (frame := _read_frame(stdin)) is not None:
            columns_len, inputs_len = HEADER.unpack_from(frame)
            body = memoryview(frame)[HEADER.size :]
            for prediction in unpack(bytes(body[:columns_len]), bytes(body[columns_len : columns_len + inputs_len])):
                predlog.offer(prediction)  # a full buffer drops and counts, as in the serving process
    finally:
        predlog.close(timeout_s=max(5.0, spec.timeout_s * 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())

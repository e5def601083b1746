"""Prediction-log test parts: a core over the tiny model that logs to a real store, served by
the real V2 REST listener, and an observer that records what the log and the feedback
desk report (what `service.metrics` turns into Prometheus samples)."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.feedback import FeedbackDesk
from service.core.observer import CoreObserver
from service.core.predlog import LogIdentity, PredictionLog
from service.predlog_process import LogSpec, ProcessPredictionLog
from service.v2.rest import V2RestApp
from tests.support.tiny_model import tiny_core
from tests.support.v2_listener import listening

INFER = "/v2/models/digits/infer"
FEEDBACK = "/v2/models/digits/feedback"


class LabelStore:
    """Labels by request id, the one store call a replay or shadow gate makes besides read_range
    (for the tests of their pairing rules; the end-to-end tests use the real store)."""

    def __init__(self, labels: dict[str, tuple[int, ...]]) -> None:
        self.labels = labels

    def labels_of(self, ids: list[str]) -> dict[str, tuple[int, ...]]:
        return {i: self.labels[i] for i in ids if i in self.labels}


class RecordingObserver(CoreObserver):
    """Sums what the prediction log and the feedback desk report."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written = 0
        self.dropped: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.online: dict[str, tuple[int, int]] = {}

    def prediction_log(self, written: int, dropped: dict[str, int], buffered: int) -> None:
        with self.lock:
            self.written += written
            self.dropped.update(dropped)

    def feedback(self, version: str, labels: int) -> None:
        with self.lock:
            self.labels[version] += labels

    def online_accuracy(self, version: str, labels: int, correct: int) -> None:
        with self.lock:
            self.online[version] = (labels, correct)


def process_spec(url: str, **overrides: Any) -> LogSpec:
    """A process log's settings: the served slot's defaults, tightened for tests."""
    spec = {"url": url, "password": None, "key_prefix": "canary:predlog", "max_len": 100_000,
            "label_window_s": 86_400, "timeout_s": 1.0, "slot": "blue", "model": "digits", "model_version": "1",
            "max_records": 10_000, "max_bytes": 64 << 20, "batch_size": 500, "flush_interval_s": 0.05,
            "keep_inputs": False}  # fmt: skip
    return LogSpec(**{**spec, **overrides})


@dataclass
class LoggedServer:
    url: str
    predlog: PredictionLog
    observer: RecordingObserver
    version: str


@contextlib.contextmanager
def logged_server(
    tmp_path: Path, store: Any, *, version: str = "1", slot: str = "blue", seed: int = 0,
    process_url: str | None = None, hang_timeout_s: float = 5.0, settle_s: float = 0.0, **log_options: Any,
) -> Iterator[LoggedServer]:  # fmt: skip
    """The tiny model (version `version`) behind the real V2 listener, logging every answer
    to `store` (and joining labels against it), until the block ends. With `process_url` the
    log's writer is a process of its own writing to that store (`ProcessPredictionLog`);
    `settle_s` is the feedback desk's (0: an id not in the store yet is refused at once)."""
    observer = RecordingObserver()
    options = {"flush_interval_s": 0.05, **log_options}
    predlog: PredictionLog
    if process_url:  # the writer in a process of its own, as a served slot runs it
        spec = process_spec(process_url, slot=slot, model_version=version, **options)
        predlog = ProcessPredictionLog(spec, observer, restart_interval_s=0.2, hang_timeout_s=hang_timeout_s)
    else:
        predlog = PredictionLog(store, LogIdentity(slot, "digits", version), observer=observer, **options)
    core = tiny_core(tmp_path, version=version, seed=seed, observer=observer, predlog=predlog)
    predlog.start()
    app = V2RestApp(8 << 20, core, FeedbackDesk(store, "digits", observer, settle_s=settle_s))
    try:
        with listening(app, close_core=True) as url:
            yield LoggedServer(url, predlog, observer, version)
    finally:
        predlog.close(5.0)

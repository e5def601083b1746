"""Prediction-log test parts: a core over the tiny model that logs to a real store, served by
the real V2 REST listener, and an observer that records what the log and the feedback
desk report (what `service.metrics` turns into Prometheus samples)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.feedback import FeedbackDesk
from service.core.observer import CoreObserver
from service.core.predlog import LogIdentity, PredictionLog
from service.v2.rest import V2RestApp
from tests.support.tiny_model import tiny_core
from tests.support.v2_listener import listening

INFER = "/v2/models/digits/infer"
FEEDBACK = "/v2/models/digits/feedback"


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.02)
    return result


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


@dataclass
class LoggedServer:
    url: str
    predlog: PredictionLog
    observer: RecordingObserver
    version: str


@contextlib.contextmanager
def logged_server(
    tmp_path: Path, store: Any, *, version: str = "1", slot: str = "blue", seed: int = 0, **log_options: Any
) -> Iterator[LoggedServer]:
    """The tiny model (version `version`) behind the real V2 listener, logging every answer
    to `store` (and joining labels against it), until the block ends."""
    observer = RecordingObserver()
    options = {"flush_interval_s": 0.05, **log_options}
    predlog = PredictionLog(store, LogIdentity(slot, "digits", version), observer=observer, **options)
    core = tiny_core(tmp_path, version=version, seed=seed, observer=observer, predlog=predlog)
    predlog.start()
    app = V2RestApp(8 << 20, core, FeedbackDesk(store, "digits", observer))
    try:
        with listening(app, close_core=True) as url:
            yield LoggedServer(url, predlog, observer, version)
    finally:
        predlog.close(5.0)

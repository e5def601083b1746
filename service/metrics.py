"""Every Prometheus metric of the service, in one place, with low-cardinality labels.

BentoML serves them at /metrics (multiprocess mode): `ServiceMetrics` must be created
inside the worker (the service's __init__), after BentoML set PROMETHEUS_MULTIPROC_DIR,
which is why prometheus_client is imported here lazily.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

from service.core.model import ModelCard
from service.core.observer import CoreObserver
from service.core.shadow_compare import ShadowTally

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics(CoreObserver):
    """Prometheus metrics for one served model version in one slot."""

    def __init__(self, card: ModelCard, slot: str) -> None:
        import prometheus_client as prom

        base = {"model": card.name, "version": card.version, "slot": slot}
        names = list(base)
        self._base = base
        self._request_children: dict[tuple[str, str], tuple] = {}
        self._batch_children: tuple | None = None
        self._queue_child: Any = None
        self._requests = prom.Counter(
            "canary_requests", "Requests by protocol and status.", [*names, "protocol", "status"]
        )
        self._latency = prom.Histogram(
            "canary_request_duration_seconds", "Request latency inside the server.", [*names, "protocol"],
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self._batch_rows = prom.Histogram("canary_batch_rows", "Rows per model batch.", names, buckets=BATCH_BUCKETS)
        self._batch_requests = prom.Histogram(
            "canary_batch_requests", "Requests per model batch.", names, buckets=BATCH_BUCKETS
        )
        self._inference = prom.Histogram(
            "canary_inference_duration_seconds", "Time of one batch in the model.", names, buckets=LATENCY_BUCKETS
        )
        self._queue = prom.Gauge("canary_queue_rows", "Rows waiting for the model.", names, multiprocess_mode="livesum")
        self._rejected = prom.Counter("canary_overload_rejections", "Requests refused: queue full.", names)
        self._cache = prom.Counter("canary_cache_events", "Cache hits, misses, errors, skips.", [*names, "kind"])
        self._cache_rejected = prom.Counter(
            "canary_cache_rejected", "Cache entries refused (served as misses), by reason.", [*names, "reason"]
        )
        self._classes = prom.Counter("canary_predictions", "Predicted class per answered row.", [*names, "class"])
        self._confidence = prom.Histogram(
            "canary_prediction_confidence", "Confidence of the predicted class.", names, buckets=CONFIDENCE_BUCKETS
        )
        self._confidence_child = self._confidence.labels(**base)
        # -- the prediction log and label feedback
        self._log_written = prom.Counter(
            "canary_prediction_log_written", "Prediction log rows the sink accepted.", names
        ).labels(**base)
        dropped = prom.Counter(
            "canary_prediction_log_dropped", "Prediction log records dropped instead of slowing requests: buffer_full "
            "(the writer is behind) or sink (a write failed).", [*names, "reason"],
        )  # fmt: skip
        self._log_dropped = {reason: dropped.labels(**base, reason=reason) for reason in ("buffer_full", "sink")}
        self._log_buffered = prom.Gauge(
            "canary_prediction_log_buffered", "Records waiting for the prediction log writer.", names,
            multiprocess_mode="livesum",
        ).labels(**base)  # fmt: skip
        self._feedback = prom.Counter(
            "canary_feedback_labels", "New labels this slot stored, by the model version that made the prediction.",
            [*names, "predicted_version"],
        )  # fmt: skip
        # Stack-wide figures read from the log's store: every slot publishes the same values
        # (take max by version); `version` is the version that made the labelled predictions.
        self._online_accuracy = prom.Gauge(
            "canary_online_accuracy", "Share of labelled rows this version predicted right (feedback).",
            ["model", "version"], multiprocess_mode="mostrecent",
        )  # fmt: skip
        self._online_labels = prom.Gauge(
            "canary_online_labels", "Labelled rows of this version's predictions (feedback).", ["model", "version"],
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        # -- input drift (service.core.drift): per worker, the worst one counts
        self._drift = prom.Gauge(
            "canary_input_drift_psi", "Mean population stability index over input features: the slot's last "
            "input rows against the model's training inputs (above 0.25: a major shift).", names,
            multiprocess_mode="livemax",
        ).labels(**base)  # fmt: skip
        self._drift_rows = prom.Gauge(
            "canary_input_drift_rows", "Input rows the drift figure is computed on.", names, multiprocess_mode="livemax",
        ).labels(**base)  # fmt: skip
        # -- the shadow diff (service.core.shadow_compare), by the stable version compared against
        shadow = [*names, "stable_version"]
        self._shadow = {
            name: prom.Counter(f"canary_shadow_{name}", help_text, shadow)
            for name, help_text in (
                ("requests_compared", "Shadow copies answered here and compared with stable's answer."),
                ("rows_compared", "Rows of those copies."),
                ("rows_agreed", "Rows where this slot and stable predicted the same class."),
                ("confidence_candidate", "This slot's top-class confidence, summed over compared rows."),
                ("confidence_stable", "Stable's top-class confidence, summed over the same rows."),
                ("latency_candidate_seconds", "This slot's latency, summed over compared requests."),
                ("latency_stable_seconds", "Stable's latency, summed over the same requests."),
            )
        }
        self._shadow_unmatched = prom.Counter(
            "canary_shadow_unmatched", "Shadow copies whose stable answer never showed in the log.", names
        ).labels(**base)
        info = prom.Gauge(
            "canary_model_info", "The served model (value 1).", [*names, "sha256", "architecture"],
            multiprocess_mode="max",
        )  # fmt: skip
        info.labels(**base, sha256=card.sha256, architecture=card.lineage.get("architecture", "unknown")).set(1)

    def request(self, protocol: str, status: str, seconds: float) -> None:
        # Label lookups cost more than the update itself: keep each child once.
        key = (protocol, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self._requests.labels(**self._base, protocol=protocol, status=status),
                self._latency.labels(**self._base, protocol=protocol),
            )
        children[0].inc()
        children[1].observe(seconds)

    def batch(self, rows: int, items: int, seconds: float) -> None:
        if self._batch_children is None:  # label lookups cost more than the updates: once
            self._batch_children = tuple(
                m.labels(**self._base) for m in (self._batch_rows, self._batch_requests, self._inference)
            )
        batch_rows, batch_requests, inference = self._batch_children
        batch_rows.observe(rows)
        batch_requests.observe(items)
        inference.observe(seconds)

    def queue_depth(self, rows: int) -> None:
        if self._queue_child is None:
            self._queue_child = self._queue.labels(**self._base)
        self._queue_child.set(rows)

    def rejected(self) -> None:
        self._rejected.labels(**self._base).inc()

    def cache_event(self, kind: str, count: int) -> None:
        self._cache.labels(**self._base, kind=kind).inc(count)

    def cache_rejected(self, reason: str, count: int) -> None:
        self._cache_rejected.labels(**self._base, reason=reason).inc(count)

    def predictions(self, classes: Sequence[int], confidences: Sequence[float]) -> None:
        for label, count in Tally(classes).items():
            self._classes.labels(**self._base, **{"class": str(label)}).inc(count)
        histogram = self._confidence_child
        for value in confidences:
            histogram.observe(value)

    def prediction_log(self, written: int, dropped: dict[str, int], buffered: int) -> None:
        if written:
            self._log_written.inc(written)
        for reason, count in dropped.items():
            child = self._log_dropped.get(reason)
            if child is not None:
                child.inc(count)
        self._log_buffered.set(buffered)

    def feedback(self, version: str, labels: int) -> None:
        self._feedback.labels(**self._base, predicted_version=version).inc(labels)

    def online_accuracy(self, version: str, labels: int, correct: int) -> None:
        model = self._base["model"]
        self._online_labels.labels(model=model, version=version).set(labels)
        if labels:
            self._online_accuracy.labels(model=model, version=version).set(correct / labels)

    def input_drift(self, psi: float, rows: int) -> None:
        self._drift.set(psi)
        self._drift_rows.set(rows)

    def shadow_compared(self, tallies: list[ShadowTally]) -> None:
        for t in tallies:
            shadow = {
                name: counter.labels(**self._base, stable_version=t.stable_version)
                for name, counter in self._shadow.items()
            }
            shadow["requests_compared"].inc(t.requests)
            shadow["rows_compared"].inc(t.rows)
            shadow["rows_agreed"].inc(t.agreed)
            shadow["confidence_candidate"].inc(t.confidence_candidate)
            shadow["confidence_stable"].inc(t.confidence_stable)
            shadow["latency_candidate_seconds"].inc(t.latency_candidate_s)
            shadow["latency_stable_seconds"].inc(t.latency_stable_s)

    def shadow_unmatched(self, copies: int) -> None:
        self._shadow_unmatched.inc(copies)

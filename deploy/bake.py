"""The bake period after a promote: the new stable is watched on its live traffic.

A promote routes all traffic to the candidate but keeps the old stable running. For the
bake period the new stable's own `/metrics` (requests by status, the latency histogram) are
read every few seconds; over a sliding window its server error ratio and p95 latency are held
against the gate's SLOs (`slo_error_ratio`, `slo_p95_ms` in loadtest/thresholds.yaml). A
breach, a dead process or a failed health check ends the bake with a reason, and the caller
switches traffic back to the old stable, still warm. Argo Rollouts and Flagger stop judging
at the last step (argo-rollouts #1978, flagger #616); this is the watch they lack.

The parsing and judging are pure (`Snapshot.parse`, `judge`); `watch` does the I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from models.errors import CanaryError


class MetricsUnavailable(CanaryError):
    """A slot's /metrics could not be read."""


# server-side failures: what a client could not have caused
_GRPC_ERRORS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def _is_error(status: str) -> bool:
    return status.startswith("5") or status in _GRPC_ERRORS


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters of one slot at one moment: requests, server errors and the
    request latency histogram (upper bound in seconds -> cumulative count)."""

    at: float
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Snapshot:
        """From the Prometheus text format the service serves at /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        requests = errors = 0.0
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "canary_requests_total":
                    requests += sample.value
                    if _is_error(sample.labels.get("status", "")):
                        errors += sample.value
                elif sample.name == "canary_request_duration_seconds_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return cls(at, requests, errors, buckets)

    def minus(self, earlier: Snapshot) -> Snapshot:
        """The traffic between `earlier` and this snapshot (a restart resets to this one)."""
        if self.requests < earlier.requests:
            return self
        buckets = {b: n - earlier.buckets.get(b, 0.0) for b, n in self.buckets.items()}
        return Snapshot(self.at, self.requests - earlier.requests, self.errors - earlier.errors, buckets)

    def p95_ms(self) -> float | None:
        """The histogram's 95th percentile (the upper bound of the bucket that holds it)."""
        total = self.buckets.get(math.inf, 0.0)
        if total <= 0:
            return None
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= 0.95 * total:
                return bound * 1000.0
        return None


@dataclass(frozen=True)
class BakeLimits:
    """When the new stable is in breach. `min_requests` in a window before it is judged
    (below it the window says nothing, either way)."""

    max_error_ratio: float
    max_p95_ms: float
    window_s: float = 30.0
    min_requests: int = 20

    @classmethod
    def from_thresholds(cls, path=None, **overrides: float) -> BakeLimits:
        from loadtest.gate import DEFAULT_THRESHOLDS, GateThresholds

        thresholds = GateThresholds.from_yaml(path or DEFAULT_THRESHOLDS)
        return cls(thresholds.slo_error_ratio, thresholds.slo_p95_ms, **overrides)  # type: ignore[arg-type]


def judge(window: Snapshot, limits: BakeLimits) -> str | None:
    """The breach in this window as one sentence, or None."""
    if window.requests < limits.min_requests:
        return None
    ratio = window.errors / window.requests
    if ratio > limits.max_error_ratio:
        return (
            f"error ratio {ratio:.1%} over the last {int(window.requests)} requests (SLO {limits.max_error_ratio:.1%})"
        )
    p95 = window.p95_ms()
    # the histogram's resolution: a p95 in the bucket above the SLO is a breach
    if p95 is not None and p95 > limits.max_p95_ms:
        return f"p95 latency at least {p95:.0f} ms over the last {int(window.requests)} requests (SLO {limits.max_p95_ms:.0f} ms)"
    return None


@dataclass(frozen=True)
class BakeResult:
    passed: bool
    reason: str
    requests: int = 0
    errors: int = 0


Probe = Callable[[], str | None]  # None while the slot is fine, else why it is not


def watch(
    metrics: Callable[[], str], probe: Probe, duration_s: float, limits: BakeLimits, *,
    interval_s: float = 2.0, say: Callable[[str], None] = lambda _: None, clock: Callable[[], float] = time.monotonic,
) -> BakeResult:  # fmt: skip
    """Watch one slot for `duration_s`; stop at the first breach. `metrics` returns the slot's
    Prometheus text (raises `MetricsUnavailable` when it cannot), `probe` why it cannot serve."""

    def read() -> Snapshot:
        return Snapshot.parse(metrics(), clock())

    start = clock()
    try:
        first = read()
    except MetricsUnavailable as exc:
        return BakeResult(False, f"its metrics are unreachable ({exc})")
    history = [first]
    last_report = start
    while True:
        now = clock()
        if now - start >= duration_s:
            total = history[-1].minus(first)
            return BakeResult(True, f"{int(total.requests)} requests, {int(total.errors)} server errors",
                              int(total.requests), int(total.errors))  # fmt: skip
        time.sleep(min(interval_s, max(0.05, duration_s - (now - start))))
        if problem := probe():
            return BakeResult(False, problem)
        try:
            history.append(read())
        except MetricsUnavailable as exc:
            return BakeResult(False, f"its metrics are unreachable ({exc})")
        latest = history[-1]
        # the window: from the newest snapshot at least window_s old (or the first)
        base = next((s for s in reversed(history) if latest.at - s.at >= limits.window_s), first)
        window = latest.minus(base)
        if breach := judge(window, limits):
            total = latest.minus(first)
            return BakeResult(False, breach, int(total.requests), int(total.errors))
        if latest.at - last_report >= 10:
            last_report = latest.at
            left = max(0, duration_s - (latest.at - start))
            say(f"baking: {int(window.requests)} requests, {int(window.errors)} errors in the window; {left:.0f}s left")

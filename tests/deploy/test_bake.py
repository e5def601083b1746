"""The bake's judgement, pure: Prometheus text in, a breach (or none) out."""

from __future__ import annotations

import math

import pytest

from deploy.bake import BakeLimits, MetricsUnavailable, Snapshot, judge, watch

LIMITS = BakeLimits(max_error_ratio=0.01, max_p95_ms=500.0, min_requests=20)


def metrics(ok: int, errors: int, slow: int = 0, status: str = "500") -> str:
    """What a slot serves at /metrics: `ok` fast answers, `errors` failures, `slow` 2 s answers."""
    base = 'model="digits",slot="green",version="2"'
    total = ok + errors + slow
    return "\n".join([
        "# TYPE canary_requests counter",
        f'canary_requests_total{{{base},protocol="rest",status="200"}} {ok + slow}',
        f'canary_requests_total{{{base},protocol="rest",status="{status}"}} {errors}',
        f'canary_requests_total{{{base},protocol="rest",status="400"}} 7',
        "# TYPE canary_request_duration_seconds histogram",
        f'canary_request_duration_seconds_bucket{{{base},protocol="rest",le="0.01"}} {ok + errors}',
        f'canary_request_duration_seconds_bucket{{{base},protocol="rest",le="2.5"}} {total}',
        f'canary_request_duration_seconds_bucket{{{base},protocol="rest",le="+Inf"}} {total}',
        f'canary_request_duration_seconds_count{{{base},protocol="rest"}} {total}',
        f'canary_request_duration_seconds_sum{{{base},protocol="rest"}} 1.0',
        "",
    ])  # fmt: skip


def window(before: str, after: str) -> Snapshot:
    return Snapshot.parse(after, 10.0).minus(Snapshot.parse(before, 0.0))


def test_a_healthy_window_is_no_breach():
    assert judge(window(metrics(100, 0), metrics(400, 1)), LIMITS) is None  # 1 in 301: under 1%


@pytest.mark.parametrize("status", ["500", "503", "INTERNAL", "UNAVAILABLE"])
def test_server_errors_over_the_slo_are_a_breach(status):
    breach = judge(window(metrics(100, 0, status=status), metrics(150, 50, status=status)), LIMITS)
    assert breach is not None and "error ratio 50.0%" in breach


def test_client_errors_are_not_the_servers_fault():
    snapshot = Snapshot.parse(metrics(100, 0), 0.0)
    assert snapshot.errors == 0 and snapshot.requests == 107


def test_a_slow_window_breaches_the_p95_slo():
    breach = judge(window(metrics(100, 0), metrics(100, 0, slow=100)), LIMITS)
    assert breach is not None and "p95 latency at least 2500 ms" in breach


def test_too_few_requests_are_not_judged_either_way():
    assert judge(window(metrics(100, 0), metrics(105, 10)), LIMITS) is None


def test_a_restarted_slot_counts_from_zero():
    later = Snapshot.parse(metrics(10, 30), 5.0)
    assert later.minus(Snapshot.parse(metrics(1000, 0), 0.0)) == later
    assert later.buckets[math.inf] == 40


class Slot:
    """A slot's /metrics over time: 25 answers per read; from read `errors_from` on, mostly errors."""

    def __init__(self, errors_from: int | None = None) -> None:
        self.reads, self.errors_from = 0, errors_from
        self.ok = self.errors = 0

    def metrics(self) -> str:
        self.reads += 1
        failing = self.errors_from is not None and self.reads >= self.errors_from
        self.ok += 25 if not failing else 5
        self.errors += 20 if failing else 0
        return metrics(self.ok, self.errors)


def test_watch_passes_a_healthy_slot_for_the_whole_bake():
    result = watch(Slot().metrics, lambda: None, 0.3, LIMITS, interval_s=0.02)
    assert result.passed and result.requests > 0 and result.errors == 0


def test_watch_stops_at_the_first_breach_with_the_reason():
    slot = Slot(errors_from=4)
    result = watch(slot.metrics, lambda: None, 30, LIMITS, interval_s=0.02)
    assert not result.passed and "error ratio" in result.reason
    assert slot.reads < 10, "the bake ran on after the breach"


def test_watch_fails_a_slot_that_dies_or_hides_its_metrics():
    died = watch(Slot().metrics, lambda: "slot green's process is gone", 30, LIMITS, interval_s=0.02)
    assert not died.passed and died.reason == "slot green's process is gone"

    def unreachable() -> str:
        raise MetricsUnavailable("ConnectError")

    hidden = watch(unreachable, lambda: None, 30, LIMITS, interval_s=0.02)
    assert not hidden.passed and "metrics are unreachable" in hidden.reason

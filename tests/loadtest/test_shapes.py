"""The load shapes (loadtest/shapes.py), driven tick by tick with a fake runner.

The fake stands for Locust's runner the way the shapes read it: `stats.total` with its
running request and failure counts and its response-time histogram, and the CPU warnings.
A fake server behind it answers at a capacity: below it each user adds throughput at a fixed
latency; beyond it throughput stays flat and latency grows with the users (Little's law),
which is what a saturated server looks like from a closed-loop load generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from loadtest.shapes import SHAPES, KneeShape, SoakShape, SpikeShape, StepShape, percentile


@dataclass
class FakeTotal:
    num_requests: int = 0
    num_failures: int = 0
    response_times: dict[int, int] = field(default_factory=dict)

    def add(self, n: int, latency_ms: float, failures: int = 0) -> None:
        self.num_requests += n
        self.num_failures += failures
        key = round(latency_ms)
        self.response_times[key] = self.response_times.get(key, 0) + n


@dataclass
class FakeServer:
    capacity_rps: float
    base_ms: float = 10.0
    fail_beyond: float | None = None  # users from which 5% of requests fail

    def second(self, total: FakeTotal, users: int) -> None:
        """One second of a closed loop of `users` flat-out users."""
        rps = min(users * 1000 / self.base_ms, self.capacity_rps)
        latency = max(self.base_ms, users / self.capacity_rps * 1000)
        failures = int(rps * 0.05) if self.fail_beyond is not None and users >= self.fail_beyond else 0
        total.add(int(rps), latency, failures)


def fake_runner() -> SimpleNamespace:
    return SimpleNamespace(stats=SimpleNamespace(total=FakeTotal()), cpu_warning_emitted=False)


def drive(shape, server: FakeServer | None = None, limit_s: int = 3600):
    """Tick once a second like Locust until the shape stops; (ticks, runner)."""
    runner, ticks = fake_runner(), []
    for t in range(limit_s):
        tick = shape.tick(float(t), runner)
        if tick is None:
            return ticks, runner
        ticks.append(tick)
        if server is not None:
            server.second(runner.stats.total, tick[0])
    raise AssertionError("the shape never stopped")


def test_step_ramp_climbs_in_equal_steps_then_stops():
    ticks, _ = drive(StepShape(users=32, steps=4, step_s=10))
    assert len(ticks) == 40
    assert [ticks[t][0] for t in (0, 9, 10, 20, 39)] == [8, 8, 16, 24, 32]


def test_spike_jumps_at_once_and_falls_back():
    ticks, _ = drive(SpikeShape(base_users=4, spike_users=40, before_s=5, spike_s=3, after_s=4))
    assert [users for users, _ in ticks] == [4] * 5 + [40] * 3 + [4] * 4
    assert all(rate >= 40 for _, rate in ticks)  # the spike arrives within a second


def test_soak_ramps_up_then_holds_until_the_end():
    ticks, _ = drive(SoakShape(users=16, ramp_s=8, hold_s=100))
    assert len(ticks) == 108 and {users for users, _ in ticks} == {16}
    assert ticks[0][1] == pytest.approx(2.0)  # 16 users over 8 s


def test_knee_finds_the_capacity_of_a_saturating_server(tmp_path):
    out = tmp_path / "knee.json"
    shape = KneeShape(start_users=2, step_users=2, step_s=10, settle_s=2, p99_ms=100, out=str(out))
    ticks, _ = drive(shape, FakeServer(capacity_rps=400, base_ms=20))
    result = shape.result
    assert result is not None and result.knee_found
    # 400 req/s saturate at 8 users (20 ms each); p99 crosses 100 ms beyond 40 users
    assert result.capacity_rps == pytest.approx(400, rel=0.02)
    assert "p99" in result.reason and result.steps[-1].users > 40 >= result.at_users
    assert max(users for users, _ in ticks) == result.steps[-1].users
    written = json.loads(out.read_text())
    assert written["capacity_rps"] == pytest.approx(result.capacity_rps) and written["knee_found"] is True


def test_knee_stops_at_the_failure_limit_even_when_latency_is_fine(tmp_path):
    shape = KneeShape(start_users=2, step_users=2, step_s=5, settle_s=1, p99_ms=1000, out=str(tmp_path / "k.json"))
    drive(shape, FakeServer(capacity_rps=1000, base_ms=10, fail_beyond=6))
    result = shape.result
    assert result is not None and result.knee_found and "failures" in result.reason
    assert result.at_users == 4 and result.steps[-1].users == 6


def test_knee_without_a_crossing_reports_a_floor(tmp_path):
    shape = KneeShape(start_users=2, step_users=2, step_s=5, settle_s=1, max_users=6, out=str(tmp_path / "k.json"))
    drive(shape, FakeServer(capacity_rps=10_000, base_ms=5))
    result = shape.result
    assert result is not None and not result.knee_found and result.at_users == 6
    assert "floor" in result.summary()


def test_knee_with_no_answers_finds_no_capacity(tmp_path):
    shape = KneeShape(start_users=2, step_users=2, step_s=5, settle_s=1, out=str(tmp_path / "k.json"))
    drive(shape)  # nothing ever answers
    assert shape.result is not None and shape.result.capacity_rps is None
    assert "no capacity" in shape.result.summary()


def test_a_new_run_starts_the_knee_over(tmp_path):
    shape = KneeShape(start_users=2, step_users=2, step_s=5, settle_s=1, max_users=4, out=str(tmp_path / "k.json"))
    drive(shape, FakeServer(capacity_rps=10_000))
    assert shape.result is not None and shape.tick(100.0, fake_runner()) is None
    shape.reset()
    assert shape.tick(0.0, fake_runner()) == (2, 2.0)


def test_knobs_come_from_the_command_line_unless_given():
    options = SimpleNamespace(step_users=10, step_steps=None, step_step_s=5.0, step_spawn_rate=None)
    shape = StepShape()
    shape.configure(options)
    assert (shape.users, shape.steps, shape.step_s) == (10, 4, 5.0)
    given = StepShape(users=3)
    given.configure(options)
    assert given.users == 3
    with pytest.raises(ValueError, match="unknown"):
        StepShape(bogus=1)
    assert set(SHAPES) == {"step", "spike", "soak", "knee"}


def test_percentile_reads_a_response_time_histogram():
    assert percentile({10: 98, 500: 2}, 0.99) == 500.0
    assert percentile({10: 99, 500: 1}, 0.99) == 10.0
    assert percentile({}, 0.99) is None

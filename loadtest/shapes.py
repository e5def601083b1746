"""Load shapes for the load-test locustfile: step ramp, spike, soak and "find the knee".

Locust runs the one `LoadTestShape` it finds in a locustfile's namespace; `loadtest/
locustfile.py` puts one there that drives the shape CANARY_SHAPE names (`CANARY_SHAPE=knee
locust -f loadtest/locustfile.py ...`, or `canary loadtest --shape knee`). A shape replaces
-u, -r and -t: it says how many users run at each moment and when the test ends. The shapes
here import no Locust (importing it monkey-patches the process for gevent): `tick(t, runner)`
takes the run time and the runner (its `stats.total` and CPU warnings), so a test drives it
with a fake.

Each shape's knobs are command-line options `--<shape>-<knob>` (environment
`CANARY_<SHAPE>_<KNOB>`), read when the shape starts; `PARAMS` lists them with their
defaults. The knee shape raises the users step by step until a step's p99 latency or failure
ratio crosses its limit, then stops the test and reports the capacity it found (the best
requests/s of a step within the limits) on stdout and in a JSON file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("canary.shape")
SHAPE_ENV = "CANARY_SHAPE"

Tick = tuple[int, float] | None


class CanaryShape:
    """A shape whose knobs (`PARAMS`: name -> (default, help)) come from the command line."""

    name: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(self, **knobs: Any) -> None:
        unknown = set(knobs) - set(self.PARAMS)
        if unknown:
            raise ValueError(f"unknown {self.name} shape knobs: {sorted(unknown)}")
        self.knobs = {key: default for key, (default, _) in self.PARAMS.items()} | knobs
        self._configured = bool(knobs)  # knobs given here win over the command line

    @classmethod
    def option(cls, knob: str) -> str:
        return f"--{cls.name}-{knob.replace('_', '-')}"

    @classmethod
    def dest(cls, knob: str) -> str:
        return f"{cls.name}_{knob}"

    def configure(self, options: Any) -> None:
        """Once, before the first tick: the knobs from the parsed command line (None: none)."""
        if self._configured:
            return
        for knob in self.PARAMS:
            value = getattr(options, self.dest(knob), None)
            if value is not None:
                self.knobs[knob] = value
        self._configured = True

    def __getattr__(self, knob: str) -> Any:
        knobs = self.__dict__.get("knobs")
        if knobs is not None and knob in knobs:
            return knobs[knob]
        raise AttributeError(knob)

    def reset(self) -> None:
        """A new run starts (the web UI can start several)."""

    def tick(self, t: float, runner: Any) -> Tick:
        """(users, spawn rate) at `t` seconds into the run, or None to stop it."""
        raise NotImplementedError


class StepShape(CanaryShape):
    """Step ramp: `users` / `steps` more users every `step_s` seconds, up to `users`, then stop."""

    name = "step"
    PARAMS = {
        "users": (32, "users at the last step"),
        "steps": (4, "number of steps"),
        "step_s": (30.0, "seconds per step"),
        "spawn_rate": (16.0, "users started per second at each step"),
    }

    def tick(self, t: float, runner: Any) -> Tick:
        step = int(t // self.step_s)
        if step >= self.steps:
            return None
        return math.ceil(self.users * (step + 1) / self.steps), self.spawn_rate


class SpikeShape(CanaryShape):
    """Spike: `base_users` for `before_s`, `spike_users` at once for `spike_s`, `base_users`
    again for `after_s` (does it recover?), then stop."""

    name = "spike"
    PARAMS = {
        "base_users": (4, "users before and after the spike"),
        "spike_users": (64, "users during the spike"),
        "before_s": (30.0, "seconds of base load before the spike"),
        "spike_s": (20.0, "seconds the spike lasts"),
        "after_s": (30.0, "seconds of base load after the spike"),
    }

    def tick(self, t: float, runner: Any) -> Tick:
        rate = float(max(self.spike_users, 1))  # every spike user at once, gone at once
        if t < self.before_s:
            return self.base_users, rate
        if t < self.before_s + self.spike_s:
            return self.spike_users, rate
        if t < self.before_s + self.spike_s + self.after_s:
            return self.base_users, rate
        return None


class SoakShape(CanaryShape):
    """Soak: ramp to `users` over `ramp_s`, hold them for `hold_s` (leaks, drift, slow
    decay), then stop."""

    name = "soak"
    PARAMS = {
        "users": (16, "users held"),
        "ramp_s": (30.0, "seconds to reach them"),
        "hold_s": (1800.0, "seconds to hold them"),
    }

    def tick(self, t: float, runner: Any) -> Tick:
        if t >= self.ramp_s + self.hold_s:
            return None
        return self.users, max(self.users / max(self.ramp_s, 1.0), 0.1)


def histogram_diff(later: dict[int, int], earlier: dict[int, int]) -> dict[int, int]:
    """Requests per rounded response time (Locust's `response_times`) between two moments."""
    return {ms: n - earlier.get(ms, 0) for ms, n in later.items() if n - earlier.get(ms, 0) > 0}


def percentile(histogram: dict[int, int], share: float) -> float | None:
    """The smallest response time that at least `share` of the requests in `histogram`
    stayed within; None for no requests."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen >= share * total:
            return float(ms)
    return float(max(histogram))


@dataclass(frozen=True)
class Snapshot:
    """Locust's running totals at one moment (all requests, every name)."""

    t: float
    requests: int
    failures: int
    response_times: dict[int, int]

    @classmethod
    def of(cls, stats: Any, t: float) -> Snapshot:
        total = stats.total
        return cls(t, total.num_requests, total.num_failures, dict(total.response_times))


@dataclass(frozen=True)
class KneeStep:
    users: int
    seconds: float
    requests: int
    rps: float
    p99_ms: float | None
    fail_ratio: float
    within: bool
    why: str = ""  # which limit it crossed


@dataclass(frozen=True)
class KneeResult:
    capacity_rps: float | None  # best req/s of a step within the limits; None: no step was
    at_users: int | None
    knee_found: bool  # a step crossed a limit; False: stopped at max_users, capacity is a floor
    reason: str
    p99_limit_ms: float
    fail_ratio_limit: float
    steps: tuple[KneeStep, ...]
    generator_cpu_warning: bool = False  # the load generator itself ran out of CPU

    def summary(self) -> str:
        if self.capacity_rps is None:
            return f"knee: no capacity within the limits ({self.reason})"
        floor = "" if self.knee_found else " (a floor: the limits were never crossed)"
        return f"knee: capacity {self.capacity_rps:.0f} req/s at {self.at_users} users{floor}; {self.reason}"


class KneeShape(CanaryShape):
    """Find the knee: `start_users`, then `step_users` more every `step_s` seconds, until a
    step's p99 exceeds `p99_ms` or its failure ratio exceeds `fail_ratio` (or `max_users` is
    reached). Each step is measured after its first `settle_s` seconds (users starting,
    connections opening). Prints the capacity and writes it to `out` (JSON)."""

    name = "knee"
    PARAMS = {
        "start_users": (4, "users at the first step"),
        "step_users": (4, "users added per step"),
        "step_s": (15.0, "seconds per step (with workers, at least 10: their stats arrive every 3 s)"),
        "settle_s": (3.0, "seconds at the start of each step left out of its figures"),
        "max_users": (256, "stop here even if no limit was crossed"),
        "p99_ms": (250.0, "p99 latency limit of a step, milliseconds"),
        "fail_ratio": (0.01, "failure ratio limit of a step"),
        "out": ("knee.json", "where the result goes (JSON)"),
    }

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.reset()

    def reset(self) -> None:
        self.steps: list[KneeStep] = []
        self.step = 0
        self.mark: Snapshot | None = None
        self.result: KneeResult | None = None

    def users_at(self, step: int) -> int:
        return min(self.start_users + step * self.step_users, self.max_users)

    def tick(self, t: float, runner: Any) -> Tick:
        if self.result is not None:
            return None
        stats = runner.stats
        step = int(t // self.step_s)
        if self.mark is None and t >= self.step * self.step_s + self.settle_s:
            self.mark = Snapshot.of(stats, t)
        if step > self.step:
            measured = self.measure(self.mark, Snapshot.of(stats, t), self.users_at(self.step))
            self.steps.append(measured)
            if not measured.within or self.users_at(self.step) >= self.max_users:
                self.finish(runner)
                return None
            self.step, self.mark = step, None
        users = self.users_at(self.step)
        return users, float(max(self.step_users, self.start_users))

    def measure(self, start: Snapshot | None, end: Snapshot, users: int) -> KneeStep:
        if start is None or end.t <= start.t:
            return KneeStep(users, 0.0, 0, 0.0, None, 0.0, False, "the step was too short to measure")
        seconds = end.t - start.t
        requests, failures = end.requests - start.requests, end.failures - start.failures
        if requests <= 0:
            return KneeStep(users, seconds, 0, 0.0, None, 0.0, False, "no request completed")
        p99 = percentile(histogram_diff(end.response_times, start.response_times), 0.99)
        fail_ratio = failures / requests
        why = []
        if p99 is not None and p99 > self.p99_ms:
            why.append(f"p99 {p99:.0f} ms > {self.p99_ms:g} ms")
        if fail_ratio > self.fail_ratio:
            why.append(f"failures {fail_ratio:.2%} > {self.fail_ratio:.2%}")
        return KneeStep(users, seconds, requests, requests / seconds, p99, fail_ratio, not why, ", ".join(why))

    def finish(self, runner: Any) -> KneeResult:
        within = [s for s in self.steps if s.within]
        best = max(within, key=lambda s: s.rps, default=None)
        last = self.steps[-1] if self.steps else None
        if last is not None and not last.within:
            reason, found = f"at {last.users} users {last.why}", True
        else:
            reason, found = f"reached max_users {self.max_users} within the limits", False
        cpu = bool(
            getattr(runner, "cpu_warning_emitted", False) or getattr(runner, "worker_cpu_warning_emitted", False)
        )
        self.result = KneeResult(
            best.rps if best else None, best.users if best else None, found, reason, float(self.p99_ms),
            float(self.fail_ratio), tuple(self.steps), cpu,
        )  # fmt: skip
        summary = self.result.summary() + (" (the load generator ran out of CPU: a floor)" if cpu else "")
        print(summary, flush=True)
        out = Path(self.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(asdict(self.result), indent=2))
            print(f"knee result: {out.resolve()}", flush=True)
        except OSError as exc:
            log.error("cannot write the knee result to %s: %s", out, exc)
        return self.result


SHAPES: dict[str, type[CanaryShape]] = {shape.name: shape for shape in (StepShape, SpikeShape, SoakShape, KneeShape)}


def add_shape_arguments(parser: Any) -> None:
    """Every shape's knobs as `--<shape>-<knob>` options. Added to a group, they stay out of
    the web UI's form (a shape reads its knobs once, when it starts)."""
    group = parser.add_argument_group("canary shapes", f"knobs of the load shapes (pick one with {SHAPE_ENV})")
    for shape in SHAPES.values():
        for knob, (default, help_text) in shape.PARAMS.items():
            group.add_argument(
                shape.option(knob), dest=shape.dest(knob), type=type(default), default=None,
                env_var=f"CANARY_{shape.name.upper()}_{knob.upper()}", help=f"{help_text} (default {default})",
            )  # fmt: skip

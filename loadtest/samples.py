"""What the gate's users send (`DigitFeed`) and what they saw (`SampleBook`); no Locust here.

`SampleBook.on_request` listens to Locust's request event, so the samples the gate judges
are the requests Locust counted and printed, plus the ones Locust never reports: a request
still unanswered when the load stops dies with its user greenlet, silently. The users
announce every request (`begin`) before sending it, and `stop` settles what is still open.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.gate import SlotStats

# A request with no answer this long after it was sent is hung, not merely caught by the end.
HANG_FLOOR_S = 2.0


def hang_after_s(timeout_s: float, slo_p95_ms: float) -> float:
    """How old an unanswered request must be, when the load stops, to count as a failure.

    A healthy request sent in the run's last moment is still open at the stop and must not
    count, so the bar sits well above a healthy latency: 4x the candidate's p95 SLO (a request
    that much slower would breach it anyway), at least 2 s (scheduling hiccups of a busy
    machine last up to about a second). It never exceeds the request timeout: a request
    older than that should already have failed by itself. The gate lets in-flight requests
    finish before it stops its users, so this is the backstop for what that wait cannot end.
    """
    return min(timeout_s, max(HANG_FLOOR_S, 4.0 * slo_p95_ms / 1000.0))


class DigitFeed:
    """The labelled test split, handed out in a fixed cycle: every input gets an id (the id
    both slots share), and a gate run covers the split evenly instead of sampling it.

    Each row is jittered (non-zero pixels lowered by less than `jitter`, staying in range):
    the digits stay what they are, but no two requests carry the same bytes, so a response
    cache keyed on the input cannot answer for the model after the first cycle (a cache hit
    skips the model, and a slower model would pass unseen).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, jitter: float = 1e-3, seed: int = 0) -> None:
        if len(x) != len(y) or not len(x):
            raise ValueError("need as many labels as digits, and at least one")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.jitter = jitter
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()  # greenlets switch only on I/O: no lock needed

    @classmethod
    def test_split(cls) -> DigitFeed:
        from models.data import load_split

        split = load_split()
        return cls(split.x_test, split.y_test)

    def next(self) -> tuple[int, np.ndarray, int]:
        """(input id, one row of pixels, its label)."""
        pair = next(self._ids)
        index = pair % len(self.y)
        row = self.x[index]
        if self.jitter:
            # Pixels are 0 or >= 1 (raw 0-16 counts): lowering the non-zero ones keeps the range.
            noise = self._rng.uniform(0, self.jitter, row.shape).astype(np.float32)
            row = np.where(row > 0, row - noise, row).astype(np.float32)
        return pair, row, int(self.y[index])

    @staticmethod
    def stable_first(pair: int) -> bool:
        """Alternate which slot's request goes out first, so neither always has the lead."""
        return pair % 2 == 0


@dataclass(frozen=True)
class Sample:
    slot: str
    protocol: str
    pair: int
    ended: float  # wall clock (s) when the answer was complete
    latency_ms: float
    ok: bool
    label: int
    predicted: int | None = None
    confidence: float | None = None
    error: str | None = None  # why it failed, as Locust reports it


@dataclass(frozen=True)
class OpenRequest:
    protocol: str
    label: int
    sent: float  # wall clock (s)


@dataclass
class SampleBook:
    """Every gate request, plus the window the load ran in (test_start -> test_stop).

    hang_s: age from which a request still open at `stop` is a failure ("no answer after
    N s"); younger ones were merely caught by the end, and their input is dropped from both
    slots (`cut`), so every input counted has an outcome from both slots.
    after_load: per slot, None if a request sent after the load got the right answer, else
    why not (filled by the locustfile; a slot missing here was not checked).
    """

    samples: list[Sample] = field(default_factory=list)
    started: float | None = None
    stopped: float | None = None
    hang_s: float = HANG_FLOOR_S
    open: dict[tuple[str, int], OpenRequest] = field(default_factory=dict)  # (slot, input id) -> request
    cut: set[int] = field(default_factory=set)
    after_load: dict[str, str | None] = field(default_factory=dict)

    def start(self) -> None:
        self.started = time.time()

    def begin(self, slot: str, protocol: str, pair: int, label: int) -> None:
        """A request is about to be sent (input ids are unique per slot: one open request each)."""
        self.open[(slot, pair)] = OpenRequest(protocol, label, time.time())

    def stop(self, now: float | None = None) -> list[Sample]:
        """The load is over and its users are gone: settle the requests still open, close the
        book (later answers are ignored, the verdict must not move) and return the hung ones."""
        now = time.time() if now is None else now
        self.stopped = now
        hung = []
        for (slot, pair), request in sorted(self.open.items()):
            age = now - request.sent
            if age >= self.hang_s:
                error = f"no answer after {age:.1f} s"
                hung.append(Sample(slot, request.protocol, pair, now, age * 1000, False, request.label, error=error))
            else:
                self.cut.add(pair)
        self.open.clear()
        self.samples.extend(hung)
        return hung

    def on_request(self, response_time: float, exception: Any = None, context: dict | None = None, **_: Any) -> None:
        """Locust `request` event listener; requests without a `slot` in context are not ours."""
        ctx = context or {}
        if "slot" not in ctx or self.stopped is not None:
            return
        self.open.pop((ctx["slot"], ctx["pair"]), None)
        ok = exception is None and ctx.get("predicted") is not None
        error = None
        if not ok:
            error = (str(exception) or type(exception).__name__) if exception is not None else "no prediction"
        self.samples.append(
            Sample(
                ctx["slot"], ctx["protocol"], ctx["pair"], time.time(), float(response_time), ok, ctx["label"],
                ctx.get("predicted") if ok else None, ctx.get("confidence") if ok else None, error,
            )
        )  # fmt: skip

    def counted(self, slot: str) -> list[Sample]:
        """The samples of `slot` the verdict uses: those whose input both slots settled."""
        return [s for s in self.samples if s.slot == slot and s.pair not in self.cut]

    def failure_reasons(self, slot: str) -> Counter[str]:
        return Counter(s.error or "failed" for s in self.counted(slot) if not s.ok)

    def window(self) -> tuple[float, float]:
        ends = [s.ended for s in self.samples]
        start = self.started if self.started is not None else min(ends, default=0.0)
        stop = self.stopped if self.stopped is not None else max(ends, default=start)
        return start, max(stop, start)

    def slot_stats(self, slot: str) -> SlotStats:
        mine = self.counted(slot)
        good = [s for s in mine if s.ok]
        start, stop = self.window()
        # Both requests of an input are sent together: an input one slot settled and the other
        # did not means requests went missing, and a candidate short of answers must not pass.
        twins = {s.pair for s in self.samples if s.slot != slot and s.pair not in self.cut}
        checked = slot in self.after_load
        after_load_error = self.after_load.get(slot)
        return SlotStats(
            name=slot,
            requests=len(mine),
            failures=len(mine) - len(good),
            duration_s=stop - start,
            latencies_ms=tuple(s.latency_ms for s in good),
            confidences=tuple(s.confidence for s in good if s.confidence is not None),
            answers={s.pair: (s.label, s.predicted) for s in good if s.predicted is not None},
            latency_by_input={s.pair: s.latency_ms for s in good},
            unpaired=len({s.pair for s in mine} - twins),
            answered_after_load=(after_load_error is None) if checked else None,
            after_load_detail=after_load_error or "",
        )

    def timeline(self, slot: str, bucket_s: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket start in s since the window start, answered per s, failed per s)."""
        start, stop = self.window()
        edges = np.arange(0.0, max(stop - start, bucket_s) + bucket_s, bucket_s)
        mine = self.counted(slot)
        ok = np.histogram([s.ended - start for s in mine if s.ok], edges)[0] / bucket_s
        failed = np.histogram([s.ended - start for s in mine if not s.ok], edges)[0] / bucket_s
        return edges[:-1], ok, failed

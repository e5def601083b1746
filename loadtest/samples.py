"""What the gate's users send (`DigitFeed`) and what they saw (`SampleBook`); no Locust here.

`SampleBook.on_request` listens to Locust's request event, so the samples the gate judges
are exactly the requests Locust counted and printed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.gate import SlotStats


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


@dataclass
class SampleBook:
    """Every gate request, plus the window the load ran in (test_start -> test_stop)."""

    samples: list[Sample] = field(default_factory=list)
    started: float | None = None
    stopped: float | None = None

    def start(self) -> None:
        self.started = time.time()

    def stop(self) -> None:
        self.stopped = time.time()

    def on_request(self, response_time: float, exception: Any = None, context: dict | None = None, **_: Any) -> None:
        """Locust `request` event listener; requests without a `slot` in context are not ours."""
        ctx = context or {}
        if "slot" not in ctx:
            return
        ok = exception is None and ctx.get("predicted") is not None
        self.samples.append(
            Sample(
                ctx["slot"], ctx["protocol"], ctx["pair"], time.time(), float(response_time), ok, ctx["label"],
                ctx.get("predicted") if ok else None, ctx.get("confidence") if ok else None,
            )
        )  # fmt: skip

    def window(self) -> tuple[float, float]:
        ends = [s.ended for s in self.samples]
        start = self.started if self.started is not None else min(ends, default=0.0)
        stop = self.stopped if self.stopped is not None else max(ends, default=start)
        return start, max(stop, start)

    def slot_stats(self, slot: str) -> SlotStats:
        mine = [s for s in self.samples if s.slot == slot]
        good = [s for s in mine if s.ok]
        start, stop = self.window()
        return SlotStats(
            name=slot,
            requests=len(mine),
            failures=len(mine) - len(good),
            duration_s=stop - start,
            latencies_ms=tuple(s.latency_ms for s in good),
            confidences=tuple(s.confidence for s in good if s.confidence is not None),
            answers={s.pair: (s.label, s.predicted) for s in good if s.predicted is not None},
            latency_by_input={s.pair: s.latency_ms for s in good},
        )

    def timeline(self, slot: str, bucket_s: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket start in s since the window start, answered per s, failed per s)."""
        start, stop = self.window()
        edges = np.arange(0.0, max(stop - start, bucket_s) + bucket_s, bucket_s)
        mine = [s for s in self.samples if s.slot == slot]
        ok = np.histogram([s.ended - start for s in mine if s.ok], edges)[0] / bucket_s
        failed = np.histogram([s.ended - start for s in mine if not s.ok], edges)[0] / bucket_s
        return edges[:-1], ok, failed

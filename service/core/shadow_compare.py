"""The shadow diff on the candidate's side: each shadow copy's answer compared with stable's
answer to the same request, published as the candidate slot's metrics.

nginx mirrors a request to the candidate with the request's own id; the candidate logs its
answer as a shadow row, stable logs its answer under the same id. After every writer cycle the
candidate's prediction log hands the rows it wrote to `ShadowComparer.after_cycle`, which keeps
the shadow ones pending and looks stable's answers up in the log's store (the same lookup the
feedback join uses). Stable's writer may log its answer a moment after ours: a copy waits up to
`wait_s` and is then counted as unmatched. Per stable version the slot counts rows compared,
rows where both predicted the same class, and sums both sides' confidences and latencies, so
over any window agreement is rate(agreed) / rate(compared) and the confidence shift the
difference of the two sums' rates per compared row (`canary_shadow_*` in service/metrics.py). `canary gate --source shadow` judges
the same pairs from the log itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.core.observer import CoreObserver

log = logging.getLogger("bento_canary.shadow")
_LOOKUP_CHUNK = 1000


@dataclass(frozen=True)
class ShadowPair:
    """One copy's rows against stable's: what the observer is told, per stable version."""

    stable_version: str
    rows: int
    agreed: int
    confidence: tuple[float, float] | None  # (candidate, stable) summed over rows; None if stable's unknown
    latency_ms: tuple[float, float] | None  # (candidate, stable) for this request


@dataclass
class _Pending:
    classes: list[int]
    confidences: list[float]
    latency_ms: float
    since: float


class ShadowComparer:
    def __init__(
        self, store: Any, model: str, observer: CoreObserver | None = None, *, wait_s: float = 10.0,
        max_pending: int = 20_000, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.store, self.model, self.wait_s, self.max_pending = store, model, wait_s, max_pending
        self.observer = observer or CoreObserver()
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    def after_cycle(self, rows: list[dict[str, Any]]) -> None:
        """Called by the log's writer thread after each cycle with the rows it wrote."""
        now = self._clock()
        unmatched = 0
        for row in rows:
            if row.get("shadow"):
                self._pending[row["request_id"]] = _Pending(
                    list(row["classes"]), list(row["confidences"]), float(row["latency_ms"]), now
                )
        while len(self._pending) > self.max_pending:  # oldest first (dicts keep insertion order)
            del self._pending[next(iter(self._pending))]
            unmatched += 1
        if self._pending:
            pairs, waiting_over = self._compare(now)
            unmatched += waiting_over
            if pairs:
                self.observer.shadow_compared(pairs)
        if unmatched:
            self.observer.shadow_unmatched(unmatched)

    def _compare(self, now: float) -> tuple[list[ShadowPair], int]:
        ids = list(self._pending)
        found: dict[str, Any] = {}
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            found.update(self.store.lookup(self.model, ids[start : start + _LOOKUP_CHUNK]))
        pairs, unmatched = [], 0
        for request_id, stable in found.items():
            mine = self._pending.pop(request_id)
            if len(stable.classes) != len(mine.classes):
                unmatched += 1
                continue
            agreed = sum(int(a == b) for a, b in zip(mine.classes, stable.classes, strict=True))
            confidence = None
            if len(stable.confidences) == len(mine.confidences):
                confidence = (sum(mine.confidences), sum(stable.confidences))
            latency = (mine.latency_ms, float(stable.latency_ms)) if stable.latency_ms is not None else None
            pairs.append(ShadowPair(str(stable.model_version), len(mine.classes), agreed, confidence, latency))
        for request_id in [rid for rid, p in self._pending.items() if now - p.since > self.wait_s]:
            del self._pending[request_id]
            unmatched += 1
        return pairs, unmatched

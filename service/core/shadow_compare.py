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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.core.observer import CoreObserver

log = logging.getLogger("bento_canary.shadow")
_LOOKUP_CHUNK = 1000


@dataclass(slots=True)
class ShadowTally:
    """The copies one writer cycle compared against one stable version, summed: what the
    observer is told (one update per counter and version, not one per copy)."""

    stable_version: str
    requests: int = 0
    rows: int = 0
    agreed: int = 0  # rows where both predicted the same class
    confidence_candidate: float = 0.0  # summed over rows, for copies whose stable answer kept them
    confidence_stable: float = 0.0
    latency_candidate_s: float = 0.0  # summed over requests, where stable's latency is known
    latency_stable_s: float = 0.0


_Pending = tuple[list[int], list[float], float, float]  # classes, confidences, latency_ms, since


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
                self._pending.pop(row["request_id"], None)  # a repeated id goes to the back, with its new time
                self._pending[row["request_id"]] = (row["classes"], row["confidences"], float(row["latency_ms"]), now)
        while len(self._pending) > self.max_pending:  # oldest first (dicts keep insertion order)
            del self._pending[next(iter(self._pending))]
            unmatched += 1
        failure: Exception | None = None
        if self._pending:
            tallies, waiting_over, failure = self._compare(now)
            unmatched += waiting_over
            if tallies:
                self.observer.shadow_compared(tallies)
        if unmatched:
            self.observer.shadow_unmatched(unmatched)
        if failure is not None:  # counted what could be; the log's writer warns about the rest
            raise failure

    def _compare(self, now: float) -> tuple[list[ShadowTally], int, Exception | None]:
        """Pair every pending copy whose stable answer is logged by now; the copies that
        waited longer than `wait_s` count as unmatched. A store with `compare_shadow` (Redis)
        pairs them itself, in one call per chunk; any other store is asked for the answers.
        A store that fails ends the pairing for this cycle (the copies of the chunks already
        paired are counted, the rest wait) and is handed back, after the expiry ran."""
        ids = list(self._pending)
        tallies: dict[str, ShadowTally] = {}
        unmatched = 0
        failure: Exception | None = None
        compare = getattr(self.store, "compare_shadow", None)
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            try:
                if compare is not None:
                    paired, done, mismatched = compare(self.model, [(i, *self._pending[i][:3]) for i in chunk])
                else:
                    paired, done, mismatched = pair_with_stable(
                        self.store.lookup(self.model, chunk), {i: self._pending[i] for i in chunk}
                    )
            except Exception as exc:  # noqa: BLE001 - handed back to the writer, which warns
                failure = exc
                break
            for request_id in done:
                del self._pending[request_id]
            unmatched += mismatched
            for tally in paired:
                merge_tally(tallies, tally)
        while self._pending:  # oldest first: the copies that waited too long are at the front
            oldest = next(iter(self._pending))
            if now - self._pending[oldest][3] <= self.wait_s:
                break
            del self._pending[oldest]
            unmatched += 1
        return list(tallies.values()), unmatched, failure


def _finite(values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def merge_tally(into: dict[str, ShadowTally], tally: ShadowTally) -> None:
    mine = into.get(tally.stable_version)
    if mine is None:
        into[tally.stable_version] = tally
        return
    for name in ShadowTally.__slots__[1:]:  # type: ignore[attr-defined]
        setattr(mine, name, getattr(mine, name) + getattr(tally, name))


def pair_with_stable(found: dict[str, Any], pending: dict[str, _Pending]) -> tuple[list[ShadowTally], list[str], int]:
    """Copies against the stable answers `found` for them: (tallies per stable version, the
    ids that are done, how many of those had another number of rows than stable's answer)."""
    tallies: dict[str, ShadowTally] = {}
    mismatched = 0
    for request_id, stable in found.items():
        classes, confidences, latency_ms, _since = pending[request_id]
        if len(stable.classes) != len(classes):
            mismatched += 1
            continue
        version = str(stable.model_version)
        tally = tallies.get(version) or tallies.setdefault(version, ShadowTally(version))
        tally.requests += 1
        tally.rows += len(classes)
        tally.agreed += sum(a == b for a, b in zip(classes, stable.classes, strict=True))
        if len(stable.confidences) == len(confidences) and _finite(confidences) and _finite(stable.confidences):
            tally.confidence_candidate += sum(confidences)
            tally.confidence_stable += sum(stable.confidences)
        if stable.latency_ms is not None:
            tally.latency_candidate_s += latency_ms / 1000
            tally.latency_stable_s += float(stable.latency_ms) / 1000
    return list(tallies.values()), list(found), mismatched

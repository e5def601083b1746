"""`canary gate --source shadow`: the candidate judged on the copies of real requests nginx
mirrored to it (`canary shadow on`), against stable's answers to the very same requests.

Both answers are in the prediction log under the same request id (nginx stamps or keeps
`X-Request-Id` before it mirrors; the copy is logged with `shadow: true`). A shadow gate reads
a window of the log, pairs each shadow answer with stable's answer to the same request and
judges with the gate's thresholds file and verdict rules (`loadtest.gate.decide_paired`):
enough paired rows, agreement, the confidence KS shift, accuracy on posted labels, and the
candidate's missing answers as its error ratio.

Latency is reported (the Locust gate's paired slowdown over the service-side latencies of the
two answers to one request), not judged: a copy is sent after the request it copies and, on a
shared host, queues behind it. Measured on the 2-core test machine: a twin's copies took
5.1-7.1 ms at the median against stable's 4.3-5.0 (paired slowdown 1.17-1.40, over the gate's
1.10). The
Locust gate, which sends both requests of a pair at the same moment, judges latency.

Missing answers: nginx mirrors REST and native-API requests (not gRPC), so from the first
mirrored request of the window to its end, every such request stable answered should have a
shadow answer too. The log is read `SHADOW_GRACE_S` past the window's end (the gate waits for
that moment, then reads until the log's writer has caught up: `read_when_settled`), so a copy
still in flight at the end, or answered but not yet written, is not missed. A request without one (the
copy failed, timed out or was shed) counts as a candidate error: a candidate that dies or
sheds during the window, even in its last second, fails the gate instead of being judged on
the copies it still answered. Users never see a shadow answer, so
this is the judgement at 0% exposure.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploy.report import check_lines, versions_line
from loadtest.gate import (
    Check,
    GateThresholds,
    GateVerdict,
    PairedAnswers,
    SlotStats,
    decide_paired,
    latency_check,
)

# How long after the window's end a copy's answer may still be logged: nginx's shadow timeout
# (1 s) + the log's flush interval (0.5 s) + slack
SHADOW_GRACE_S = 3.0
SETTLE_TAIL_S = 10.0  # the window's last seconds, counted until the log's writer has caught up
MIRRORED = frozenset({"rest", "bentoml"})  # the protocols nginx mirrors (gRPC is not mirrored)
MAX_REQUESTS = 500_000  # requests of a window held in memory at most


def read_when_settled(
    read: Callable[[], Iterable[dict[str, Any]]],
    tail: Callable[[], Iterable[dict[str, Any]]],
    *,
    quiet_s: float = 1.0,
    limit_s: float = 15.0,
) -> Iterable[dict[str, Any]]:
    """`read()` once the log's writer has caught up with the window's end: two counts of
    `tail()` (the last seconds of the window and the grace) `quiet_s` apart agree, or
    `limit_s` has passed. The writer lags the answers by a flush interval, more on a loaded
    machine, and a copy not written yet would count as the candidate's error. Only the tail
    is counted; the window itself is read once, a page at a time."""
    deadline = time.monotonic() + limit_s
    count = sum(1 for _ in tail())
    while time.monotonic() + quiet_s <= deadline:
        time.sleep(quiet_s)
        again = sum(1 for _ in tail())
        if again == count:
            break
        count = again
    return read()


@dataclass
class ShadowWindow:
    """Stable's and the shadow candidate's answers in a window, paired by request id."""

    candidate: str = ""  # the model version that answered the shadow copies
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (stable, shadow)
    stable_versions: Counter[str] = field(default_factory=Counter)
    expected: int = 0  # mirrored stable answers that should have a shadow answer
    missing: int = 0  # of those, without one
    other_shadow: Counter[str] = field(default_factory=Counter)  # shadow answers of other versions (left out)
    truncated: bool = False

    @property
    def candidate_error_ratio(self) -> float | None:
        return self.missing / self.expected if self.expected else None


def pair_shadow(rows: Iterable[dict[str, Any]], until: float) -> ShadowWindow:
    """Pair the shadow answers with stable's answers (up to `until`, the window's end; `rows`
    may run past it by the grace) to the same requests. The candidate is the version of the
    newest shadow answer; shadow answers of other versions (an earlier candidate in the same
    window) are left out and counted."""
    live: dict[str, dict[str, Any]] = {}
    shadow: dict[str, dict[str, Any]] = {}
    window = ShadowWindow()
    newest = -1.0
    for count, row in enumerate(rows):
        if count == MAX_REQUESTS:
            window.truncated = True
            break
        if row.get("shadow"):
            shadow[row["request_id"]] = row
            if row["time"] >= newest:
                newest, window.candidate = row["time"], str(row["model_version"])
        elif row["time"] <= until:
            live[row["request_id"]] = row
    for rid, row in list(shadow.items()):
        if str(row["model_version"]) != window.candidate:
            window.other_shadow[str(row["model_version"])] += 1
            del shadow[rid]
    if not shadow:
        return window
    # from the first mirrored request on (its stable answer may be logged just before its copy's)
    first = min(live[rid]["time"] if rid in live else row["time"] for rid, row in shadow.items())
    for rid, stable in live.items():
        if str(stable["model_version"]) == window.candidate:
            continue  # answered by the candidate itself (forced or weighted): not a comparison
        copy = shadow.get(rid)
        if copy is not None and len(copy["classes"]) == len(stable["classes"]):
            window.pairs.append((stable, copy))
            window.stable_versions[str(stable["model_version"])] += len(stable["classes"])
        if stable["protocol"] in MIRRORED and first <= stable["time"]:
            window.expected += 1
            window.missing += copy is None
    return window


@dataclass(frozen=True)
class ShadowReport:
    window: ShadowWindow
    answers: PairedAnswers
    verdict: GateVerdict
    latency: Check  # reported, not part of the verdict (see the module docstring)

    def lines(self) -> list[str]:
        w, a = self.window, self.answers
        live = versions_line(w.stable_versions)
        out = [
            f"shadow gate: {a.rows:,} rows of {len(w.pairs):,} mirrored requests answered by candidate "
            f"v{w.candidate or '?'} and by stable ({live})"
            + ("; window cut at the first 500,000" if w.truncated else "")
        ]
        if w.expected:
            out.append(f"mirrored requests without a candidate answer: {w.missing:,} of {w.expected:,}")
        if w.other_shadow:
            out.append("left out: " + ", ".join(f"{n:,} shadow answers of v{v}" for v, n in w.other_shadow.items()))
        if a.rows:
            out.append(
                f"agreement {a.agreement:.4f}; mean confidence {np.mean(a.confidences):.4f} vs stable "
                f"{np.mean(a.live_confidences):.4f} (shift {a.confidence_shift:+.4f})"
            )
        out += check_lines(self.verdict.checks)
        out.append(f"  (not judged) copy latency vs stable: {self.latency.detail}")
        out.append(self.verdict.summary)
        return out


def judge_shadow(window: ShadowWindow, store: Any, thresholds: GateThresholds) -> ShadowReport:
    """The verdict on a paired window; labels posted for the stable answers are joined from `store`."""
    ids = [stable["request_id"] for stable, _ in window.pairs]
    labels = store.labels_of(ids) if ids else {}
    live_classes, live_conf, classes, conf, truth = [], [], [], [], []
    stable_lat, shadow_lat = {}, {}
    for i, (stable, copy) in enumerate(window.pairs):
        live_classes += stable["classes"]
        live_conf += stable["confidences"]
        classes += copy["classes"]
        conf += copy["confidences"]
        label = labels.get(stable["request_id"])
        n = len(stable["classes"])
        truth += list(label) if label is not None and len(label) == n else [-1] * n
        stable_lat[i], shadow_lat[i] = float(stable["latency_ms"]), float(copy["latency_ms"])
    answers = PairedAnswers(
        np.asarray(live_classes, dtype=np.int64), np.asarray(live_conf, dtype=np.float32),
        np.asarray(classes, dtype=np.int64), np.asarray(conf, dtype=np.float32), np.asarray(truth, dtype=np.int64),
    )  # fmt: skip
    n = len(window.pairs)
    stable_stats = SlotStats("stable", n, 0, 0.0, tuple(stable_lat.values()), latency_by_input=stable_lat)
    shadow_stats = SlotStats("candidate", n, 0, 0.0, tuple(shadow_lat.values()), latency_by_input=shadow_lat)
    ratio = window.candidate_error_ratio
    errors = Check(
        "candidate_error_ratio", ratio, thresholds.slo_error_ratio,
        ratio is not None and ratio <= thresholds.slo_error_ratio,
        f"{window.missing} of {window.expected} mirrored requests without a candidate answer",
    )  # fmt: skip
    latency = latency_check(stable_stats, shadow_stats, thresholds)
    return ShadowReport(window, answers, decide_paired(answers, thresholds, "shadowed rows", (errors,)), latency)

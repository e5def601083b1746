"""`canary gate --source live`: the candidate judged on the real traffic it answered at its
weight, against what stable answered in the same window, with the gate's thresholds file.

The figures:
- answered requests per slot and their service-side latency: the prediction log's rows of the
  window (shadow copies left out: their clients never saw them);
- accuracy: the labels applications posted (`POST /v2/models/<model>/feedback`) for those
  requests, per slot. The two slots answered different requests, so the drop is judged with
  its sampling noise (`loadtest.stats.accuracy_drop`): fail when it is surely beyond
  `max_accuracy_drop_pp`, pass when surely within, otherwise inconclusive with the labels (and
  requests at the current weight and label rate) still needed;
- server errors: each slot's own counters (`canary_requests_total` by status on its
  `/metrics`) since the slot started (the candidate's since its deploy); the prediction log
  records answers only. The SLO (`slo_error_ratio`) on the candidate's ratio, and the increase
  over stable's with Fisher's exact test (`max_error_ratio_increase`);
- latency: the candidate's p95 against `slo_p95_ms` is judged. The slots' medians are
  reported, not compared: unpaired medians of two identical slots on a shared 2-core machine
  were measured 0.74-1.28 apart (see `loadtest.gate.paired_slowdown`); the Locust gate, which
  sends both requests of a pair at once, judges relative latency.

No labels at all is inconclusive, never a pass: live traffic alone says nothing about whether
the answers are right (`--source shadow` compares them with stable's without labels).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploy.bake import Snapshot
from deploy.report import check_lines
from loadtest.gate import FAIL, INCONCLUSIVE, PASS, Check, GateThresholds, GateVerdict
from loadtest.stats import LIVE_ALPHA, accuracy_drop, error_increase_p
from models.errors import CanaryError
from service.core.drift import ALERT_PSI

MAX_ROWS = 500_000  # answered requests of a window held in memory at most
_LABEL_CHUNK = 5_000  # ids per labels_of call


@dataclass
class SlotWindow:
    """One slot's answers (to its clients) in the window, and the labels posted for them."""

    slot: str
    version: str
    requests: int = 0
    rows: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    classes: dict[str, list[int]] = field(default_factory=dict)  # request id -> predicted class per row
    labelled: int = 0  # rows with a posted label
    correct: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def p(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


@dataclass
class LiveWindow:
    stable: SlotWindow
    candidate: SlotWindow
    weight: int  # the candidate's share of traffic, percent
    seconds: float
    left_out: int = 0  # rows of other slots or versions (an earlier candidate in the window)
    truncated: bool = False


def read_window(rows: Iterable[dict[str, Any]], stable: SlotWindow, candidate: SlotWindow) -> tuple[int, bool]:
    """Sort the window's client-facing rows into the two slots (by slot and model version);
    return (rows left out, truncated)."""
    by_slot = {(stable.slot, stable.version): stable, (candidate.slot, candidate.version): candidate}
    left_out = 0
    for count, row in enumerate(rows):
        if count == MAX_ROWS:
            return left_out, True
        if row.get("shadow"):
            continue
        target = by_slot.get((row["slot"], str(row["model_version"])))
        if target is None:
            left_out += 1
            continue
        target.requests += 1
        target.rows += len(row["classes"])
        target.latencies_ms.append(float(row["latency_ms"]))
        target.classes[row["request_id"]] = list(row["classes"])
    return left_out, False


def join_labels(window: SlotWindow, store: Any) -> None:
    """Count the rows with a posted label and those predicted right."""
    ids = list(window.classes)
    for start in range(0, len(ids), _LABEL_CHUNK):
        for request_id, label in store.labels_of(ids[start : start + _LABEL_CHUNK]).items():
            predicted = window.classes[request_id]
            if len(label) == len(predicted):
                window.labelled += len(label)
                window.correct += sum(int(a == b) for a, b in zip(label, predicted, strict=True))


@dataclass(frozen=True)
class LiveReport:
    window: LiveWindow
    counters: tuple[Snapshot, Snapshot]  # (stable, candidate) since each slot started
    verdict: GateVerdict
    undecided: frozenset[str] = frozenset()  # checks that wait for more data (not failed)
    drift: tuple[float | None, float | None] = (None, None)  # input drift PSI (stable, candidate)

    def lines(self) -> list[str]:
        w, (cs, cc) = self.window, self.counters
        s, c = w.stable, w.candidate
        out = [
            f"live gate: {w.seconds:.0f} s of traffic; candidate v{c.version} ({c.slot}, {w.weight}%) "
            f"vs stable v{s.version} ({s.slot})" + ("; window cut at the first 500,000 rows" if w.truncated else ""),
            f"answered requests: candidate {c.requests:,}, stable {s.requests:,}"
            + (f" ({w.left_out:,} rows of other slots or versions left out)" if w.left_out else ""),
            f"labelled rows: candidate {c.labelled:,} ({_share(c.accuracy)} right), "
            f"stable {s.labelled:,} ({_share(s.accuracy)} right)",
            f"server errors since each slot started: candidate {cc.errors:,.0f} of {cc.requests:,.0f}, "
            f"stable {cs.errors:,.0f} of {cs.requests:,.0f}",
        ]
        out += check_lines(self.verdict.checks, self.undecided)
        out.append(f"  (not judged) median latency: candidate {_ms(c.p(50))} vs stable {_ms(s.p(50))}, service side")
        drift = " vs stable ".join("n/a" if d is None else f"{d:.3f}" for d in reversed(self.drift))
        out.append(f"  (not judged) input drift PSI: candidate {drift} (alert above {ALERT_PSI})")
        out.append(self.verdict.summary)
        return out


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _about(n: float) -> str:
    """A count rounded to two significant figures: 'about 1,300'."""
    if not math.isfinite(n) or n > 10_000_000:
        return "more than 10,000,000"
    n = max(1, math.ceil(n))
    digits = max(0, len(str(n)) - 2)
    return f"{round(n, -digits):,}"


def judge_live(window: LiveWindow, counters: tuple[Snapshot, Snapshot], t: GateThresholds) -> LiveReport:
    s, c = window.stable, window.candidate
    cs, cc = counters
    share = window.weight / 100
    checks: list[Check] = []
    waiting: dict[str, str] = {}  # undecided check -> what it needs

    samples_ok = c.requests >= t.min_samples_per_slot
    checks.append(Check("samples_candidate", float(c.requests), t.min_samples_per_slot, samples_ok,
                        "requests the candidate answered in the window"))  # fmt: skip
    if not samples_ok:
        more = (t.min_samples_per_slot - c.requests) / share
        waiting["samples_candidate"] = f"needs about {_about(more)} more requests at {window.weight}%"

    ratio_c = cc.errors / cc.requests if cc.requests else None
    ratio_s = cs.errors / cs.requests if cs.requests else 0.0
    checks.append(Check("candidate_error_ratio", ratio_c, t.slo_error_ratio,
                        ratio_c is not None and ratio_c <= t.slo_error_ratio,
                        f"{cc.errors:.0f} server errors of {cc.requests:.0f} requests"))  # fmt: skip
    if ratio_c is None:
        waiting["candidate_error_ratio"] = waiting["error_ratio_increase"] = (
            "waits: the candidate has answered nothing yet"
        )
        increase, p_value = None, 1.0
    else:
        increase = ratio_c - ratio_s
        p_value = error_increase_p(int(cc.errors), int(cc.requests), int(cs.errors), int(cs.requests))
    significant = increase is not None and increase > t.max_error_ratio_increase and p_value < LIVE_ALPHA
    checks.append(Check("error_ratio_increase", increase, t.max_error_ratio_increase,
                        increase is not None and not significant,
                        f"Fisher exact p={p_value:.3g} (alpha {LIVE_ALPHA}); stable {ratio_s:.4g}"))  # fmt: skip

    p95 = c.p(95)
    checks.append(Check("candidate_p95_ms", p95, t.slo_p95_ms, p95 is not None and p95 <= t.slo_p95_ms,
                        "service-side latency of the candidate's answers"))  # fmt: skip
    if p95 is None:
        waiting["candidate_p95_ms"] = "waits: no answer of the candidate in the window"

    accuracy, note = _accuracy_check(s, c, t, window.weight)
    checks.append(accuracy)
    if note:
        waiting[accuracy.name] = note

    failed = [ch for ch in checks if not ch.passed and ch.name not in waiting]
    if failed:
        verdict = FAIL
        reason = "; ".join(f"{ch.name} {_fmt(ch.value)} (limit {ch.limit:g})" for ch in failed)
    elif waiting:
        verdict, reason = INCONCLUSIVE, "; ".join(f"{name} {need}" for name, need in waiting.items())
    else:
        verdict = PASS
        reason = f"{len(checks)} checks passed on {c.requests:,} live requests and {c.labelled:,} labelled rows"
    return LiveReport(window, counters, GateVerdict(verdict, tuple(checks), f"{verdict}: {reason}"), frozenset(waiting))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _accuracy_check(s: SlotWindow, c: SlotWindow, t: GateThresholds, weight: int) -> tuple[Check, str]:
    """The drop in percentage points, three-valued; the note says what an undecided one needs."""
    limit = t.max_accuracy_drop_pp
    if not c.labelled or not s.labelled:
        who = "the candidate's" if not c.labelled else "stable's"
        return Check("accuracy_drop_pp", None, limit, False, "no labels"), (
            f"waits: no labels posted for {who} answers in the window "
            "(POST /v2/models/<model>/feedback; --source shadow judges without labels)"
        )
    est = accuracy_drop(s.correct, s.labelled, c.correct, c.labelled, limit / 100)
    detail = (
        f"{100 * est.drop:.2f} pp, one-sided {1 - LIVE_ALPHA:.0%} bounds [{100 * est.lower:.2f}, "
        f"{100 * est.upper:.2f}] on {c.labelled:,} vs {s.labelled:,} labelled rows"
    )
    check = Check("accuracy_drop_pp", 100 * est.drop, limit, est.state == "pass", detail)
    if est.state != "undecided":
        return check, ""
    factor = est.scale_needed() - 1
    more_c = factor * c.labelled
    label_rate = c.labelled / c.rows if c.rows else 0.0
    requests = (
        f" (about {_about(more_c / label_rate / (weight / 100))} more requests at {weight}%)" if label_rate else ""
    )
    return check, f"needs about {_about(more_c)} more labelled candidate rows{requests}"


def live_gate(stack: Any, store: Any, start: float, end: float, thresholds: GateThresholds) -> LiveReport:
    """Read the stack's roles and counters and the log's window; judge."""
    status = stack.status()
    stable_slot, candidate_slot, weight = status["stable"], status["candidate"], int(status["weight"])
    if not candidate_slot:
        raise CanaryError("no candidate is deployed: nothing to judge (canary deploy <version>)")
    if weight <= 0:
        raise CanaryError(
            "the candidate takes no live traffic at weight 0: set a weight (canary weight 10) "
            "or judge it at 0% with --source shadow"
        )
    stable = SlotWindow(stable_slot, str(status["slots"][stable_slot]["model_version"]))
    candidate = SlotWindow(candidate_slot, str(status["slots"][candidate_slot]["model_version"]))
    now = time.time()
    texts = (stack.slot_metrics(stable_slot), stack.slot_metrics(candidate_slot))
    counters = (Snapshot.parse(texts[0], now), Snapshot.parse(texts[1], now))
    left_out, truncated = read_window(store.read_range(start, end), stable, candidate)
    for side in (stable, candidate):
        join_labels(side, store)
    window = LiveWindow(stable, candidate, weight, end - start, left_out, truncated)
    report = judge_live(window, counters, thresholds)
    return dataclasses.replace(report, drift=(drift_of(texts[0]), drift_of(texts[1])))


def drift_of(metrics_text: str) -> float | None:
    """The slot's input drift figure (`canary_input_drift_psi`), None when it publishes none."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "canary_input_drift_psi":
                return float(sample.value)
    return None


@dataclass(frozen=True)
class LiveOutcome:
    """A live verdict in the shape a rollout step reads (`deploy.rollout.walk_steps`)."""

    exit_code: int
    verdict: GateVerdict | None
    error: str | None = None


def step_wait(since: float, duration_s: float, looks: int, now: float) -> float:
    """Seconds until look number `looks` of a step that started at `since` is due: the first
    after one step duration, a second look (the first was inconclusive) after two."""
    return max(0.0, since + duration_s * looks - now)


def live_step(stack: Any, options: Any, since: float, say: Callable[[str], None], looks: int = 1) -> LiveOutcome:
    """One rollout step judged on real traffic: wait until `looks` step durations have passed
    since the step's weight took effect, then judge the window from then to now. The verdict
    is kept as the stack's last gate and in its history, like a Locust gate's."""
    from loadtest.gate import DEFAULT_THRESHOLDS, GateThresholds

    wait = step_wait(since, options.duration_s, looks, time.time())
    if wait > 0:
        say(f"waiting {wait:.0f} s for live traffic at this weight")
        time.sleep(wait)
    thresholds = GateThresholds.from_yaml(options.thresholds or DEFAULT_THRESHOLDS)
    store = stack.prediction_store()
    try:
        report = live_gate(stack, store, since, time.time(), thresholds)
    except CanaryError as exc:
        return LiveOutcome(2, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - the store's own errors: the gate could not run
        return LiveOutcome(2, None, f"cannot read the prediction log: {type(exc).__name__}: {exc}")
    finally:
        store.close()
    for line in report.lines()[:-1]:
        say(line)
    verdict = report.verdict
    record = {"verdict": verdict.verdict, "summary": verdict.summary, "exit_code": int(not verdict.passed),
              "source": "live", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    state = stack.store.load()
    record["weight"] = state.weight
    with stack.store.locked():
        stack.store.save(dataclasses.replace(stack.store.load(), last_gate=record))
    stack.store.history.append(
        "gate", f"{verdict.verdict} (live) at {state.weight}% for {state.slots[state.candidate].bento}", verdict.summary
    )
    return LiveOutcome(0 if verdict.passed else 1, verdict)

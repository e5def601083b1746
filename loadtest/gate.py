"""The promotion gate's verdict: pure functions over per-slot samples, no Locust, no I/O
beyond reading the thresholds file.

`decide(stable, candidate, thresholds)` runs every check and returns a `GateVerdict`:
"pass" only when both slots got enough traffic and every check passed, "inconclusive" when
either slot got too little traffic or stable stopped answering (whatever the figures say),
"fail" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp, mannwhitneyu

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")


@dataclass(frozen=True)
class GateThresholds:
    """Limits of the gate; `loadtest/thresholds.yaml` documents each field."""

    min_samples_per_slot: int
    slo_p95_ms: float
    slo_error_ratio: float
    latency_alpha: float
    max_latency_slowdown: float
    max_error_ratio_increase: float
    max_accuracy_drop_pp: float
    min_agreement: float
    max_confidence_ks: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"threshold {f.name} must be a non-negative number, got {value!r}")
        for name in ("slo_error_ratio", "latency_alpha", "min_agreement", "max_confidence_ks"):
            if getattr(self, name) > 1:
                raise ValueError(f"threshold {name} is a fraction and must lie in [0, 1]")
        if self.min_samples_per_slot < 1:
            raise ValueError("threshold min_samples_per_slot must be at least 1")

    @classmethod
    def from_yaml(cls, path: Path | str = DEFAULT_THRESHOLDS) -> GateThresholds:
        """Load and validate a thresholds file; every field is required, unknown keys refused."""
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of threshold names to numbers")
        expected = {f.name for f in fields(cls)}
        if missing := expected - data.keys():
            raise ValueError(f"{path}: missing thresholds {sorted(missing)}")
        if unknown := data.keys() - expected:
            raise ValueError(f"{path}: unknown thresholds {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class SlotStats:
    """What one slot showed during the gate, from its successful requests: latencies,
    top-class confidences, and per input id (shared by both slots: the same digit sent to
    both at the same moment) the (label, predicted class) and the latency.

    unpaired: requests of this slot whose twin (the same input to the other slot) has no
    outcome; None = not tracked. answered_after_load: whether a request sent once the load
    stopped got this slot's right answer (a slot that died in the run's last moment has
    nothing else to show it); None = not checked, `after_load_detail` says why not.
    """

    name: str
    requests: int
    failures: int
    duration_s: float
    latencies_ms: tuple[float, ...] = ()
    confidences: tuple[float, ...] = ()
    answers: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    latency_by_input: Mapping[int, float] = field(default_factory=dict)
    unpaired: int | None = None
    answered_after_load: bool | None = None
    after_load_detail: str = ""

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    @property
    def p50_ms(self) -> float | None:
        return self.percentile(50)

    @property
    def p95_ms(self) -> float | None:
        return self.percentile(95)

    @property
    def p99_ms(self) -> float | None:
        return self.percentile(99)

    @property
    def throughput_rps(self) -> float:
        """Successful requests per second over the gate's window."""
        return (self.requests - self.failures) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_ratio(self) -> float | None:
        return self.failures / self.requests if self.requests else None

    @property
    def accuracy(self) -> float | None:
        """Share of correctly classified labelled requests (all of this slot's answers)."""
        if not self.answers:
            return None
        return sum(label == predicted for label, predicted in self.answers.values()) / len(self.answers)

    def summary(self) -> dict[str, Any]:
        """The figures for result.json and the report (no raw samples)."""
        return {
            "requests": self.requests, "failures": self.failures, "duration_s": round(self.duration_s, 3),
            "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms,
            "throughput_rps": self.throughput_rps, "error_ratio": self.error_ratio, "accuracy": self.accuracy,
            "mean_confidence": float(np.mean(self.confidences)) if self.confidences else None,
            "unpaired": self.unpaired, "answered_after_load": self.answered_after_load,
            "after_load_detail": self.after_load_detail,
        }  # fmt: skip


@dataclass(frozen=True)
class Check:
    """One rule of the gate: `value` measured against `limit` (None = could not be measured,
    which never passes)."""

    name: str
    value: float | None
    limit: float
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class GateVerdict:
    verdict: str  # PASS, FAIL or INCONCLUSIVE
    checks: tuple[Check, ...]
    summary: str

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary, "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateVerdict:
        return cls(data["verdict"], tuple(Check(**c) for c in data["checks"]), data["summary"])


def _at_most(name: str, value: float | None, limit: float, detail: str = "") -> Check:
    return Check(name, value, limit, value is not None and value <= limit, detail)


def _at_least(name: str, value: float | None, limit: float, detail: str = "") -> Check:
    return Check(name, value, limit, value is not None and value >= limit, detail)


def paired_slowdown(stable: SlotStats, candidate: SlotStats) -> float | None:
    """1 + the median, over inputs both slots answered, of (candidate - stable) latency,
    relative to stable's median on those inputs: 1.2 = the candidate adds a fifth.

    Paired, because the two requests of an input were in flight at the same moment, so the
    machine's hiccups hit both; differences rather than ratios, because a hiccup multiplies
    one latency several times over and ratios of such pairs swing widely. On a busy shared
    2-core machine, 33 gate runs of two identical models (6-12 s) gave 0.96-1.03 (one run
    under heavy outside load 1.14), where the ratio of the slots' overall medians ranged
    0.74-1.28: each server alternates fast and slow spells, and the median of such a bimodal
    distribution jumps between its modes.
    """
    s, c = stable.latency_by_input, candidate.latency_by_input
    common = list(s.keys() & c.keys())
    base = float(np.median([s[k] for k in common])) if common else 0.0
    if base <= 0:
        return None
    return 1.0 + float(np.median([c[k] - s[k] for k in common])) / base


def latency_check(stable: SlotStats, candidate: SlotStats, t: GateThresholds) -> Check:
    """Slower only if significant (one-sided Mann-Whitney U on all latency samples) AND
    practically relevant (paired slowdown above the limit): with thousands of samples the
    test alone flags differences of a few percent that come from the machine."""
    name, limit = "latency_regression", t.max_latency_slowdown
    slowdown = paired_slowdown(stable, candidate)
    if slowdown is None or not stable.latencies_ms or not candidate.latencies_ms:
        return Check(name, None, limit, False, "no input answered by both slots to compare")
    p_value = float(mannwhitneyu(candidate.latencies_ms, stable.latencies_ms, alternative="greater").pvalue)
    slower = p_value < t.latency_alpha and slowdown > limit
    detail = (
        f"paired slowdown {slowdown:.3f} (limit {limit}), Mann-Whitney U p={p_value:.3g} (alpha {t.latency_alpha}); "
        f"p50 {candidate.p50_ms:.1f} vs {stable.p50_ms:.1f} ms"
    )
    return Check(name, slowdown, limit, not slower, detail)


def paired_checks(stable: SlotStats, candidate: SlotStats, t: GateThresholds) -> list[Check]:
    """Accuracy drop and agreement on the inputs both slots answered, confidence shift."""
    common = stable.answers.keys() & candidate.answers.keys()
    detail = f"{len(common)} inputs answered by both"
    drop = agreement = None
    if common:
        right_s = sum(stable.answers[k][0] == stable.answers[k][1] for k in common)
        right_c = sum(candidate.answers[k][0] == candidate.answers[k][1] for k in common)
        drop = 100.0 * (right_s - right_c) / len(common)
        agreement = sum(stable.answers[k][1] == candidate.answers[k][1] for k in common) / len(common)
    ks = None
    if stable.confidences and candidate.confidences:
        ks = float(ks_2samp(stable.confidences, candidate.confidences).statistic)
    return [
        _at_most("accuracy_drop_pp", drop, t.max_accuracy_drop_pp, detail),
        _at_least("agreement", agreement, t.min_agreement, detail),
        _at_most("confidence_ks", ks, t.max_confidence_ks, "KS statistic of top-class confidence"),
    ]


def after_load_check(stats: SlotStats) -> Check:
    answered = bool(stats.answered_after_load)
    detail = "answered right" if answered else stats.after_load_detail or "no right answer"
    return Check(f"{stats.name}_answers_after_load", float(answered), 1.0, answered, detail)


def paired_requests_check(stable: SlotStats, candidate: SlotStats) -> Check:
    """Every input went to both slots at once, so both must have settled the same inputs."""
    unpaired = (stable.unpaired or 0) + (candidate.unpaired or 0)
    detail = f"{stable.requests} stable vs {candidate.requests} candidate requests, {unpaired} without their twin"
    return Check("requests_paired", float(unpaired), 0.0, unpaired == 0, detail)


def decide(stable: SlotStats, candidate: SlotStats, thresholds: GateThresholds) -> GateVerdict:
    """Judge the candidate against stable; see the module docstring for the verdict rules."""
    t = thresholds
    enough = [_at_least(f"samples_{s.name}", float(s.requests), t.min_samples_per_slot) for s in (stable, candidate)]
    # Without a live stable there is nothing to compare with: no verdict on the candidate.
    stable_alive = [after_load_check(stable)] if stable.answered_after_load is not None else []
    judgeable = [*enough, *stable_alive]
    liveness = [after_load_check(candidate)] if candidate.answered_after_load is not None else []
    tracked = stable.unpaired is not None or candidate.unpaired is not None
    pairing = [paired_requests_check(stable, candidate)] if tracked else []
    increase = None
    if stable.error_ratio is not None and candidate.error_ratio is not None:
        increase = candidate.error_ratio - stable.error_ratio
    checks = (
        *judgeable,
        *liveness,
        *pairing,
        _at_most("candidate_p95_ms", candidate.p95_ms, t.slo_p95_ms),
        _at_most("candidate_error_ratio", candidate.error_ratio, t.slo_error_ratio),
        latency_check(stable, candidate, t),
        _at_most("error_ratio_increase", increase, t.max_error_ratio_increase),
        *paired_checks(stable, candidate, t),
    )
    failed = [c for c in checks if not c.passed]
    if not all(c.passed for c in judgeable):
        verdict = INCONCLUSIVE
        short = [f"{c.name} {c.value:.0f} < {c.limit:.0f}" for c in enough if not c.passed]
        reasons = ["too little traffic: " + ", ".join(short)] if short else []
        reasons += [f"stable does not answer after the load: {c.detail}" for c in stable_alive if not c.passed]
        reason = "; ".join(reasons)
    elif failed:
        verdict, reason = FAIL, "; ".join(_failure(c) for c in failed)
    else:
        verdict = PASS
        reason = (
            f"{len(checks)} checks passed; p95 {_fmt(candidate.p95_ms)} vs {_fmt(stable.p95_ms)} ms, "
            f"errors {_fmt(candidate.error_ratio)}, accuracy {_fmt(candidate.accuracy)} vs {_fmt(stable.accuracy)}"
        )
    return GateVerdict(verdict, checks, f"{verdict}: {reason}")


def _failure(check: Check) -> str:
    if check.name.endswith("_answers_after_load"):
        return f"{check.name}: {check.detail}"  # a yes/no: the reason says more than the figure
    return f"{check.name} {_fmt(check.value)} (limit {_fmt(check.limit)})"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@dataclass(frozen=True)
class PairedAnswers:
    """A candidate's answers to real inputs, row for row with what stable answered users: a
    replay of logged inputs (`canary score --replay`) or shadow copies (`canary gate --source
    shadow`). labels: the posted ground truth per row, -1 where none was."""

    live_classes: np.ndarray
    live_confidences: np.ndarray
    classes: np.ndarray
    confidences: np.ndarray
    labels: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.classes)

    @property
    def agreement(self) -> float | None:
        return float(np.mean(self.classes == self.live_classes)) if self.rows else None

    @property
    def confidence_shift(self) -> float | None:
        """Mean top-class confidence, candidate minus live (negative: the candidate is less sure)."""
        return float(np.mean(self.confidences) - np.mean(self.live_confidences)) if self.rows else None

    def class_mix(self, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Share of rows per predicted class: (live, candidate)."""
        if not self.rows:
            return np.zeros(classes), np.zeros(classes)
        live = np.bincount(self.live_classes, minlength=classes)[:classes] / self.rows
        return live, np.bincount(self.classes, minlength=classes)[:classes] / self.rows

    def accuracies(self) -> tuple[float, float, int] | None:
        """(live accuracy, candidate accuracy, labelled rows), None without labels."""
        labelled = self.labels >= 0
        count = int(labelled.sum())
        if not count:
            return None
        truth = self.labels[labelled]
        live = float(np.mean(self.live_classes[labelled] == truth))
        return live, float(np.mean(self.classes[labelled] == truth)), count


def _paired_accuracy_check(stats: PairedAnswers, accuracies: tuple[float, float, int], t: GateThresholds) -> Check:
    """The drop on the labelled rows fails only when over the limit AND McNemar's exact test on
    the discordant rows says it is not chance (one discordant row in 40 labels is 2.5 points)."""
    from loadtest.stats import LIVE_ALPHA, mcnemar_p

    live, candidate, count = accuracies
    drop = 100.0 * (live - candidate)
    labelled = stats.labels >= 0
    truth = stats.labels[labelled]
    live_right, candidate_right = stats.live_classes[labelled] == truth, stats.classes[labelled] == truth
    b, c = int((live_right & ~candidate_right).sum()), int((candidate_right & ~live_right).sum())
    p_value = mcnemar_p(b, c)
    significant = drop > t.max_accuracy_drop_pp and p_value < LIVE_ALPHA
    detail = f"{count} labelled rows; McNemar exact p={p_value:.3g} (alpha {LIVE_ALPHA}) on {b}+{c} discordant"
    return Check("accuracy_drop_pp", drop, t.max_accuracy_drop_pp, not significant, detail)


def decide_paired(
    stats: PairedAnswers, thresholds: GateThresholds, what: str, extra: tuple[Check, ...] = ()
) -> GateVerdict:
    """Judge a candidate on real inputs with the gate's limits: enough rows
    (min_samples_per_slot), agreement with stable's answers (min_agreement), the KS shift of
    top-class confidence (max_confidence_ks), where labels were posted the accuracy drop
    (max_accuracy_drop_pp), and the caller's `extra` checks. Too few rows is "inconclusive",
    never "pass". `what` names the rows ("logged rows", "shadowed rows")."""
    t = thresholds
    enough = _at_least(f"samples_{what.split()[0]}", float(stats.rows), t.min_samples_per_slot, what)
    ks = None
    if stats.rows:
        ks = float(ks_2samp(stats.live_confidences, stats.confidences).statistic)
    checks = [
        enough,
        *extra,
        _at_least("agreement", stats.agreement, t.min_agreement, f"{stats.rows} {what}"),
        _at_most("confidence_ks", ks, t.max_confidence_ks, "KS statistic of top-class confidence"),
    ]
    if (accuracies := stats.accuracies()) is not None:
        checks.append(_paired_accuracy_check(stats, accuracies, t))
    failed = [c for c in checks if not c.passed]
    if not enough.passed:
        verdict = INCONCLUSIVE
        needs = t.min_samples_per_slot - stats.rows
        reason = f"too few {what}: {stats.rows} < {t.min_samples_per_slot:.0f} (needs about {needs:.0f} more)"
    elif failed:
        verdict, reason = FAIL, "; ".join(_failure(c) for c in failed)
    else:
        verdict = PASS
        reason = f"{len(checks)} checks passed; agreement {_fmt(stats.agreement)} on {stats.rows} {what}"
    return GateVerdict(verdict, tuple(checks), f"{verdict}: {reason}")

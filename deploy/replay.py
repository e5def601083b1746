"""`canary score --replay`: a candidate judged on the real inputs the prediction log kept,
before it takes any traffic.

The log keeps inputs only when the slots run with `CANARY_SERVICE_PREDICTION_LOG_INPUTS=true`
(off by default: inputs may be personal data). A replay reads the log's rows of a window (the
local stack's Redis, or the store `--from` names), keeps the requests that carry their input
and were answered live by another version than the candidate (shadow copies and the
candidate's own answers say nothing about what users got), runs the candidate's exported graph
on those inputs (sha256 checked, the very `predict` batch scoring runs, so it answers as the
served Bento does) and compares row for row with the live answers: agreement, confidence
shift, class mix and, where labels were posted, accuracy. The verdict uses the gate's
thresholds file (`loadtest.gate.decide_paired`): exit 0 on pass, 1 on fail or too few rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploy.report import versions_line
from loadtest.gate import GateThresholds, GateVerdict, PairedAnswers, decide_paired
from models.errors import CanaryError
from service.core.predlog import UnreadableInput, row_inputs

MAX_ROWS = 1_000_000  # rows held in memory at most (256 MB of digits); beyond, the window's first are replayed
_LABEL_BATCH = 5000  # request ids per label lookup


@dataclass
class LoggedInputs:
    """The replayable part of a window: inputs and what was answered live, row for row."""

    features: list[np.ndarray] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    requests: int = 0  # requests replayed
    versions: Counter[str] = field(default_factory=Counter)  # rows per live model version
    skipped: Counter[str] = field(default_factory=Counter)  # requests left out, per reason
    truncated: bool = False

    @property
    def rows(self) -> int:
        return len(self.classes)


def _skip_reason(row: dict[str, Any], candidate: str) -> str | None:
    if row.get("shadow"):
        return "shadow copies"
    if str(row.get("model_version")) == candidate:
        return "answered by the candidate itself"
    if not row.get("input_b64"):
        return "logged without their input"
    return None


def collect_logged(rows: Iterator[dict[str, Any]], store: Any, candidate: str, width: int) -> LoggedInputs:
    """The rows of `rows` a replay of `candidate` can use, with labels joined from `store`."""
    logged = LoggedInputs()
    pending: list[tuple[dict[str, Any], np.ndarray]] = []

    def settle() -> None:
        found = store.labels_of([row["request_id"] for row, _ in pending])
        for row, inputs in pending:
            label = found.get(row["request_id"])
            n = len(inputs)
            logged.features.append(inputs)
            logged.classes += [int(c) for c in row["classes"]]
            logged.confidences += [float(c) for c in row["confidences"]]
            logged.labels += [int(v) for v in label] if label is not None and len(label) == n else [-1] * n
            logged.versions[str(row["model_version"])] += n
            logged.requests += 1
        pending.clear()

    held = 0
    for row in rows:
        if (reason := _skip_reason(row, candidate)) is not None:
            logged.skipped[reason] += 1
            continue
        try:
            inputs = row_inputs(row)
        except UnreadableInput:
            inputs = None
        classes = row.get("classes") or []
        if inputs is None or inputs.ndim != 2 or inputs.shape[1] != width or len(classes) != len(inputs):
            logged.skipped[f"unreadable or not {width} values per row"] += 1
            continue
        if held + len(inputs) > MAX_ROWS:
            logged.truncated = True
            break
        pending.append((row, inputs))
        held += len(inputs)
        if len(pending) == _LABEL_BATCH:
            settle()
    if pending:
        settle()
    return logged


@dataclass(frozen=True)
class ReplayReport:
    candidate: str  # registered name/version
    sha256: str
    logged: LoggedInputs
    stats: PairedAnswers
    verdict: GateVerdict
    classes: int

    def lines(self) -> list[str]:
        logged, stats = self.logged, self.stats
        live = versions_line(logged.versions)
        out = [
            f"replayed {stats.rows:,} logged rows ({logged.requests:,} requests; answered live by {live}) "
            f"with {self.candidate} (sha256 {self.sha256[:12]}...)"
            + (f"; stopped at {MAX_ROWS:,} rows" if logged.truncated else "")
        ]
        if logged.skipped:
            out.append("left out: " + ", ".join(f"{n:,} {why}" for why, n in sorted(logged.skipped.items())))
        if stats.rows:
            ks = next((c.value for c in self.verdict.checks if c.name == "confidence_ks"), None)
            ks_text = "n/a" if ks is None else f"{ks:.3f}"
            out.append(
                f"agreement {stats.agreement:.4f}; mean confidence {np.mean(stats.confidences):.4f} vs live "
                f"{np.mean(stats.live_confidences):.4f} (shift {stats.confidence_shift:+.4f}, KS {ks_text})"
            )
            if (accuracies := stats.accuracies()) is not None:
                was, now, count = accuracies
                out.append(f"accuracy on {count:,} labelled rows: {now:.4f} vs live {was:.4f}")
            live_mix, mix = stats.class_mix(self.classes)
            out.append("class mix (live -> candidate): " + "  ".join(
                f"{k}: {a:.1%}->{b:.1%}" for k, (a, b) in enumerate(zip(live_mix, mix, strict=True))))  # fmt: skip
        out.append(self.verdict.summary)
        return out


def replay_candidate(
    home: Any,
    release: str,
    store: Any,
    since: float,
    until: float,
    thresholds: GateThresholds,
    say: Callable[[str], None],
    progress: Callable[[int, int | None], None] | None = None,
) -> ReplayReport:
    """Score version or @alias `release` on the logged inputs of [since, until) and judge it."""
    import os

    from models.score_model import open_runner, predict, resolve_scoring_model

    model = resolve_scoring_model(home, release)
    candidate = str(model.ref.version)
    logged = collect_logged(store.read_range(since, until), store, candidate, model.width)
    if not logged.rows:
        why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(logged.skipped.items())) or "no rows at all"
        raise CanaryError(
            f"nothing to replay in the window ({why}); the log keeps inputs only when the slots run with "
            "CANARY_SERVICE_PREDICTION_LOG_INPUTS=true"
        )
    features = np.concatenate(logged.features).astype(np.float32, copy=False)
    say(f"replaying {len(features):,} logged rows with {model.ref.label} (sha256 {model.sha256[:12]}...)")
    runner = open_runner(model.path, model.card, threads=len(os.sched_getaffinity(0)))
    classes, confidences = [], []
    step = 16_384
    for start in range(0, len(features), step):
        answer = predict(runner, features[start : start + step])
        classes.append(answer.classes)
        confidences.append(answer.confidences)
        if progress is not None:
            progress(min(start + step, len(features)), len(features))
    stats = PairedAnswers(
        np.asarray(logged.classes, dtype=np.int64),
        np.asarray(logged.confidences, dtype=np.float32),
        np.concatenate(classes),
        np.concatenate(confidences),
        np.asarray(logged.labels, dtype=np.int64),
    )
    width = (
        model.scores_width if model.scores_width > 0 else int(max(stats.classes.max(), stats.live_classes.max())) + 1
    )
    return ReplayReport(
        model.ref.label, model.sha256, logged, stats, decide_paired(stats, thresholds, "logged rows"), width
    )

"""`canary gate --source live`'s judgement (issue 15): the rows of a window sorted into the two
slots, the labels joined, and the verdict with its statistics. Pure: rows and counters made
here; the end-to-end run against a served stack is in tests/deploy/test_stack.py."""

from __future__ import annotations

import re

import pytest

from deploy.bake import Snapshot
from deploy.live_gate import LiveWindow, SlotWindow, join_labels, judge_live, live_gate, read_window, step_wait
from loadtest.gate import FAIL, INCONCLUSIVE, PASS, GateThresholds
from loadtest.stats import accuracy_drop, error_increase_p
from models.errors import CanaryError
from tests.support.predlog import LabelStore

LIMITS = GateThresholds.from_yaml()


def traffic(slot: str, version: str, requests: int, right: int, start: int = 0, labelled: int | None = None):
    """`requests` one-row answers of `slot`; the first `right` predict their label; labels
    are posted for the first `labelled` of them (all by default)."""
    rows, labels = [], {}
    for n in range(start, start + requests):
        rid = f"{slot}-{n}"
        rows.append({"request_id": rid, "time": float(n), "slot": slot, "model_version": version, "shadow": False,
                     "classes": [n % 10], "confidences": [0.9], "latency_ms": 5.0, "protocol": "rest"})  # fmt: skip
        if labelled is None or n - start < labelled:
            labels[rid] = (n % 10,) if n - start < right else ((n + 1) % 10,)
    return rows, labels


def judged(stable_traffic, candidate_traffic, weight=50, errors=((0, 10_000), (0, 10_000))):
    (rows_s, labels_s), (rows_c, labels_c) = stable_traffic, candidate_traffic
    window = LiveWindow(SlotWindow("blue", "1"), SlotWindow("green", "2"), weight, 600.0)
    read_window(rows_s + rows_c, window.stable, window.candidate)
    store = LabelStore({**labels_s, **labels_c})
    join_labels(window.stable, store)
    join_labels(window.candidate, store)
    (es, ns), (ec, nc) = errors
    return judge_live(window, (Snapshot(0, ns, es), Snapshot(0, nc, ec)), LIMITS)


def check(report, name):
    return next(c for c in report.verdict.checks if c.name == name)


def test_a_candidate_5_points_less_accurate_fails_once_enough_labels_arrived():
    report = judged(traffic("blue", "1", 1000, 980), traffic("green", "2", 1000, 930))
    assert report.verdict.verdict == FAIL, report.verdict.summary
    drop = check(report, "accuracy_drop_pp")
    assert not drop.passed and 4.5 < drop.value < 5.5
    assert report.verdict.summary.startswith("fail: accuracy_drop_pp")
    assert "labelled rows: candidate 1,000 (93.00% right), stable 1,000 (98.00% right)" in report.lines()


def test_before_that_it_is_inconclusive_and_says_how_many_more_labels():
    early = judged(traffic("blue", "1", 1000, 49, labelled=50), traffic("green", "2", 1000, 47, labelled=50))
    assert early.verdict.verdict == INCONCLUSIVE, early.verdict.summary
    need = re.search(r"needs about ([\d,]+) more labelled candidate rows \(about ([\d,]+) more requests at 50%\)",
                     early.verdict.summary)  # fmt: skip
    assert need, early.verdict.summary
    labels, requests = (int(g.replace(",", "")) for g in need.groups())
    # labels arrive for 5% of the candidate's answers, and it takes half the traffic
    assert requests == pytest.approx(labels / 0.05 / 0.5, rel=0.05)
    # with that many more labels at the same accuracies the gate decides (fails)
    grown = 50 + labels
    decided = judged(
        traffic("blue", "1", grown, round(grown * 0.98)), traffic("green", "2", grown, round(grown * 0.94))
    )
    assert decided.verdict.verdict == FAIL


def test_a_twin_passes_and_its_figures_are_reported():
    report = judged(traffic("blue", "1", 5000, 4900), traffic("green", "2", 5000, 4900))
    assert report.verdict.verdict == PASS, report.verdict.summary
    assert report.verdict.summary == "pass: 5 checks passed on 5,000 live requests and 5,000 labelled rows"
    assert check(report, "accuracy_drop_pp").value == pytest.approx(0.0)


def test_without_labels_it_never_passes():
    report = judged(traffic("blue", "1", 1000, 0, labelled=0), traffic("green", "2", 1000, 0, labelled=0))
    assert report.verdict.verdict == INCONCLUSIVE
    assert "no labels posted for the candidate's answers" in report.verdict.summary


def test_too_few_candidate_requests_is_inconclusive_with_the_requests_needed_at_the_weight():
    report = judged(traffic("blue", "1", 3000, 2950), traffic("green", "2", 100, 99), weight=10)
    assert report.verdict.verdict == INCONCLUSIVE
    assert "samples_candidate needs about 3,000 more requests at 10%" in report.verdict.summary


def test_an_error_increase_fails_only_when_it_is_more_than_chance():
    # 2% server errors against none: beyond the 0.5-point limit and far from chance
    bad = judged(traffic("blue", "1", 1000, 980), traffic("green", "2", 1000, 980), errors=((0, 2000), (40, 2000)))
    assert bad.verdict.verdict == FAIL
    assert not check(bad, "error_ratio_increase").passed and not check(bad, "candidate_error_ratio").passed
    # 3 of 400 against 0 of 400: 0.75 points, over the limit, but Fisher's p is 0.12
    assert error_increase_p(3, 400, 0, 400) == pytest.approx(0.1243, abs=1e-3)
    lucky = judged(traffic("blue", "1", 1000, 980), traffic("green", "2", 1000, 980), errors=((0, 400), (3, 400)))
    assert check(lucky, "error_ratio_increase").passed and check(lucky, "candidate_error_ratio").passed


def test_shadow_copies_and_other_slots_or_versions_are_left_out():
    stable_rows, stable_labels = traffic("blue", "1", 500, 500)
    candidate_rows, candidate_labels = traffic("green", "2", 500, 500)
    old, _ = traffic("green", "0", 30, 30, start=1000)  # an earlier candidate in the same window
    copies = [dict(row, shadow=True, request_id=f"copy-{i}") for i, row in enumerate(candidate_rows[:40])]
    stable, candidate = SlotWindow("blue", "1"), SlotWindow("green", "2")
    left_out, truncated = read_window(stable_rows + candidate_rows + old + copies, stable, candidate)
    assert (left_out, truncated, stable.requests, candidate.requests) == (30, False, 500, 500)
    join_labels(candidate, LabelStore(candidate_labels))
    assert (candidate.labelled, candidate.correct) == (500, 500)


def test_the_interval_is_honest_at_zero_and_all_right():
    est = accuracy_drop(200, 200, 200, 200, margin=0.01)
    assert est.state == "undecided" and est.lower < 0 < est.upper  # 200/200 both: not yet proof
    assert accuracy_drop(4000, 4000, 4000, 4000, margin=0.01).state == "pass"


class FakeStack:
    """Roles and counters as `LocalStack.status()` and `slot_metrics` give them."""

    def __init__(self, candidate: str | None, weight: int) -> None:
        self.candidate, self.weight = candidate, weight

    def status(self):
        slots = {"blue": {"model_version": "1"}, "green": {"model_version": "2"}}
        return {"stable": "blue", "candidate": self.candidate, "weight": self.weight, "slots": slots}

    def slot_metrics(self, slot: str) -> str:  # pragma: no cover - refused before
        raise AssertionError("not read")


@pytest.mark.parametrize(
    ("candidate", "weight", "message"),
    [(None, 0, "no candidate is deployed"), ("green", 0, "no live traffic at weight 0")],
)
def test_refusals_are_one_line(candidate, weight, message):
    with pytest.raises(CanaryError, match=message) as caught:
        live_gate(FakeStack(candidate, weight), LabelStore({}), 0.0, 1.0, LIMITS)
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_in_one_line(capsys):
    from tests.support.canary_cli import canary_in_process

    cases = [
        (("--target", "k8s", "gate", "--source", "live"), "on k8s judge real traffic with --source shadow"),
        (("gate", "--source", "live", "--since", "yesterday"), "time 'yesterday' must be like"),
        (("rollout", "--source", "shadow"), "--source must be locust or live for a rollout"),
        (("--target", "k8s", "rollout", "--source", "live"), "rollout --source live"),
    ]
    for args, expected in cases:
        code, _, err = canary_in_process(capsys, *args)
        assert code == 1 and expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)


def test_a_rollout_step_looks_after_its_duration_and_a_second_look_after_another():
    assert step_wait(since=100.0, duration_s=30.0, looks=1, now=110.0) == 20.0
    assert step_wait(since=100.0, duration_s=30.0, looks=2, now=131.0) == 29.0  # a real second window
    assert step_wait(since=100.0, duration_s=30.0, looks=1, now=200.0) == 0.0

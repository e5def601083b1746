"""`canary gate --source shadow`, the pairing and verdict rules: shadow copies paired with
stable's answers to the same request, missing copies counted as the candidate's errors. The
end-to-end test (real nginx mirroring to real slots) is in tests/deploy/test_stack.py."""

from __future__ import annotations

import threading
import time

import numpy as np

from deploy.shadow_diff import SHADOW_GRACE_S, judge_shadow, pair_shadow, read_when_settled
from loadtest.gate import FAIL, INCONCLUSIVE, PASS, GateThresholds
from tests.support.predlog import LabelStore
from tests.support.waiting import wait_until

THRESHOLDS = GateThresholds.from_yaml()


def answer(rid: str, t: float, version: str, cls: int, *, shadow=False, protocol="rest", latency=2.0, conf=0.9):
    return {
        "request_id": rid, "time": t, "slot": "green" if shadow else "blue", "model_version": version,
        "protocol": protocol, "shadow": shadow, "classes": [cls], "confidences": [conf], "latency_ms": latency,
    }  # fmt: skip


def traffic(n: int, candidate=lambda i: i % 10, answered=lambda i: True, t0=1000.0, latency=2.0):
    """n requests one every 10 ms answered by stable v1, each mirrored to candidate v2."""
    rows = []
    for i in range(n):
        t = t0 + i * 0.01
        rows.append(answer(f"r{i}", t, "1", i % 10, conf=0.5 + (i % 50) / 100))
        if answered(i):
            rows.append(answer(f"r{i}", t + 0.001, "2", candidate(i), shadow=True, latency=latency,
                               conf=0.5 + (i % 50) / 100))  # fmt: skip
    return rows


def test_copies_pair_with_stables_answer_to_the_same_request():
    rows = [
        answer("a", 10.0, "1", 3), answer("a", 10.1, "2", 3, shadow=True),
        answer("b", 11.0, "1", 4), answer("b", 11.2, "2", 5, shadow=True),
        answer("c", 12.0, "1", 1),  # mirrored, no copy answered: missing
        answer("d", 12.5, "1", 1, protocol="grpc"),  # gRPC is not mirrored: not expected
        answer("e", 13.0, "2", 2),  # forced to the candidate: no comparison
        answer("f", 9.0, "3", 2, shadow=True),  # an earlier candidate's copy: left out
        answer("g", 99.0, "1", 6),  # after the window's end (the log is read a grace past it)
        answer("g", 99.1, "2", 6, shadow=True),
    ]  # fmt: skip
    window = pair_shadow(rows, until=99.0 - SHADOW_GRACE_S / 2)
    assert window.candidate == "2"
    assert [(s["request_id"], c["classes"]) for s, c in window.pairs] == [("a", [3]), ("b", [5])]
    assert (window.expected, window.missing) == (3, 1)
    assert window.other_shadow == {"3": 1}
    assert window.stable_versions == {"1": 2}


def test_a_twin_passes_a_disagreeing_or_dying_candidate_fails_and_too_little_is_inconclusive():
    def verdict(rows, labels=None):
        return judge_shadow(pair_shadow(rows, until=1000.0 + 100), LabelStore(labels or {}), THRESHOLDS).verdict

    twin = verdict(traffic(600))
    assert twin.verdict == PASS, twin.summary
    disagreeing = verdict(traffic(600, candidate=lambda i: (i + (i % 4 == 0)) % 10))
    assert disagreeing.verdict == FAIL and "agreement 0.75" in disagreeing.summary
    dying = verdict(traffic(2000, answered=lambda i: i < 1000))  # answers the first half, then nothing
    assert dying.verdict == FAIL and "candidate_error_ratio 0.5" in dying.summary
    last_second = judge_shadow(pair_shadow(traffic(600, answered=lambda i: i < 590), until=1000.0 + 5.99),
                               LabelStore({}), THRESHOLDS).verdict  # fmt: skip
    assert last_second.verdict == FAIL and "candidate_error_ratio 0.01667" in last_second.summary
    little = verdict(traffic(100))
    assert little.verdict == INCONCLUSIVE and "needs about 300 more" in little.summary
    nothing = verdict([answer(f"r{i}", 1000.0 + i, "1", 1) for i in range(500)])
    assert nothing.verdict == INCONCLUSIVE
    # labels posted for stable's answers: a candidate wrong on 5% of labelled rows fails on accuracy
    labels = {f"r{i}": (i % 10,) for i in range(600)}
    worse = verdict(traffic(600, candidate=lambda i: (i + (i % 20 == 0)) % 10), labels)
    assert worse.verdict == FAIL and "accuracy_drop_pp 5" in worse.summary and "agreement" not in worse.summary


def test_the_report_names_the_candidate_the_pairs_and_the_missing_copies():
    rows = traffic(500, answered=lambda i: i != 7)
    report = judge_shadow(pair_shadow(rows, until=1100.0), LabelStore({}), THRESHOLDS)
    text = "\n".join(report.lines())
    assert "499 rows of 499 mirrored requests answered by candidate v2 and by stable (v1: 499)" in text
    assert "mirrored requests without a candidate answer: 1 of 500" in text
    assert np.isclose(report.answers.agreement, 1.0)
    slower = judge_shadow(pair_shadow(traffic(600, latency=4.0), until=1100.0), LabelStore({}), THRESHOLDS)
    assert slower.verdict.passed  # copies queue behind the request they copy: latency is reported only
    assert "(not judged) copy latency vs stable: paired slowdown 2.000" in "\n".join(slower.lines())


def test_shadow_gate_refusals_are_one_line(capsys):
    from tests.support.canary_cli import canary_in_process

    cases = [
        (("gate", "--source", "nope"), "--source must be locust, shadow, live or all"),
        (("--target", "k8s", "gate", "--source", "shadow"), "give --from"),
        (("gate", "--source", "shadow", "--since", "yesterday"), "time 'yesterday' must be like"),
        (("gate", "--source", "shadow", "--from", "ftp://x"), "--from"),
    ]
    for args, expected in cases:
        code, _, err = canary_in_process(capsys, *args)
        assert code == 1 and expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)


def test_the_window_is_read_until_the_logs_writer_has_caught_up():
    """The candidate's writer lags its answers (a flush interval, more under load): the last
    copies reach the log after the gate's grace. Read once, they are missing, counted as the
    candidate's errors, and a twin fails; read until two reads agree, it passes."""
    rows = traffic(600)
    copies = [row for row in rows if row["shadow"]]
    log = [row for row in rows if row not in copies[-40:]]  # the last 40 copies not written yet

    def writer() -> None:
        for row in copies[-40:]:
            time.sleep(0.01)
            log.append(row)

    early = pair_shadow(list(log), until=rows[-1]["time"])
    assert (early.expected, early.missing) == (600, 40)
    assert judge_shadow(early, LabelStore({}), THRESHOLDS).verdict.verdict == FAIL
    late = threading.Thread(target=writer)
    late.start()
    wait_until(lambda: len(log) > len(rows) - 40, 10, "the late writer to start")
    # a second between counts: the writer (10 ms a row) would have to stall that long to be missed
    settled = read_when_settled(lambda: list(log), lambda: [row for row in log if row["time"] > rows[-1]["time"] - 1],
                                quiet_s=1.0, limit_s=20)  # fmt: skip
    late.join()
    window = pair_shadow(settled, until=rows[-1]["time"])
    assert (window.expected, window.missing) == (600, 0)
    assert judge_shadow(window, LabelStore({}), THRESHOLDS).verdict.verdict == PASS


def test_a_log_that_keeps_growing_is_read_for_at_most_the_limit():
    grown = []
    started = time.monotonic()
    rows = list(read_when_settled(lambda: list(grown), lambda: grown.append({}) or grown, quiet_s=0.1, limit_s=0.5))
    assert 0.4 <= time.monotonic() - started < 5 and len(rows) >= 4

"""The promotion gate: its verdict rules on synthetic samples, its exit-code contract with
short real Locust runs, the issue's four scenarios against real served Bentos, and that it
cannot be fooled by the router (who answered, the force token, a slot dying mid-run)."""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from loadtest.gate import FAIL, INCONCLUSIVE, PASS, GateThresholds, GateVerdict, SlotStats, decide
from loadtest.results import exit_code_for
from loadtest.run_gate import locust_command, log_to_mlflow, run_gate
from loadtest.samples import DigitFeed, SampleBook, hang_after_s
from loadtest.targets import FORCE_TOKEN_ENV, Target, from_args
from loadtest.v2codec import WrongAnswer, from_rest_answer
from tests.support.gate_fixtures import (
    FAKE_DURATION_S,
    FAKE_TIMEOUT_S,
    GateSlot,
    fake_gate,
    fake_slot,
    fake_target,
    fake_thresholds,
    gate,
    gate_slot,
    run_locust,
)
from tests.support.waiting import wait_until

pytest_plugins = ["tests.support.gate_fixtures"]  # stable_slot, twin_slot, twin_outcomes, worse_model...

THRESHOLDS = GateThresholds.from_yaml()
N = 1000  # synthetic samples per slot, well above min_samples_per_slot


def slot(name: str, latencies, *, failures=0, correct=0.9, confidences=None, predictions=None) -> SlotStats:
    """Synthetic slot figures: input i has label i % 10, answered right for the first
    `correct` share of inputs, else predicted as (label + 1) % 10 (unless `predictions`)."""
    latencies = tuple(float(v) for v in latencies)
    n = len(latencies)
    labels = [i % 10 for i in range(n)]
    if predictions is None:
        predictions = [lab if i < correct * n else (lab + 1) % 10 for i, lab in enumerate(labels)]
    answers = {i: (labels[i], int(predictions[i])) for i in range(n)}
    confidences = tuple(confidences if confidences is not None else np.linspace(0.6, 1.0, n))
    return SlotStats(
        name, n + failures, failures, 10.0, latencies, confidences, answers, dict(enumerate(latencies))
    )  # fmt: skip


def base_latencies(seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(20), 0.4, n)


def failed(verdict: GateVerdict) -> set[str]:
    return {c.name for c in verdict.checks if not c.passed}


# -- verdict rules (pure) ----------------------------------------------------------------


def test_identical_slots_pass_every_check():
    latencies = base_latencies()
    verdict = decide(slot("stable", latencies), slot("candidate", latencies * 1.0), THRESHOLDS)
    assert verdict.verdict == PASS and failed(verdict) == set() and exit_code_for(verdict) == 0


def test_too_little_traffic_is_inconclusive_never_pass():
    few = base_latencies(n=THRESHOLDS.min_samples_per_slot - 1)
    verdict = decide(slot("stable", few), slot("candidate", few), THRESHOLDS)
    assert verdict.verdict == INCONCLUSIVE
    assert failed(verdict) == {"samples_stable", "samples_candidate"}
    assert exit_code_for(verdict) == 1


def test_a_20_percent_slower_candidate_fails_on_latency():
    latencies = base_latencies()
    verdict = decide(slot("stable", latencies), slot("candidate", latencies * 1.2), THRESHOLDS)
    assert verdict.verdict == FAIL and failed(verdict) == {"latency_regression"}


def test_a_significant_but_tiny_slowdown_passes():
    stable, candidate = base_latencies(n=20000), base_latencies(n=20000) * 1.03
    # Mann-Whitney U alone would fail it; the practical-effect guard lets it through.
    assert mannwhitneyu(candidate, stable, alternative="greater").pvalue < THRESHOLDS.latency_alpha
    verdict = decide(slot("stable", stable), slot("candidate", candidate), THRESHOLDS)
    assert verdict.verdict == PASS


def test_a_large_but_insignificant_slowdown_passes():
    few = replace(THRESHOLDS, min_samples_per_slot=5)
    stable = [10.0, 30.0, 12.0, 28.0, 20.0]
    verdict = decide(slot("stable", stable), slot("candidate", [v * 1.2 for v in stable]), few)
    assert verdict.verdict == PASS  # 5 samples cannot show it: the practical effect needs the test too


def test_errors_fail_the_slo_and_the_comparison():
    latencies = base_latencies()
    verdict = decide(slot("stable", latencies), slot("candidate", latencies, failures=20), THRESHOLDS)
    assert failed(verdict) == {"candidate_error_ratio", "error_ratio_increase"}


def test_an_error_increase_within_the_slo_still_fails():
    loose = replace(THRESHOLDS, slo_error_ratio=0.05)
    latencies = base_latencies()
    verdict = decide(slot("stable", latencies), slot("candidate", latencies, failures=10), loose)
    assert failed(verdict) == {"error_ratio_increase"}


def test_a_3_point_accuracy_drop_fails():
    latencies = base_latencies()
    verdict = decide(slot("stable", latencies, correct=0.90), slot("candidate", latencies, correct=0.87), THRESHOLDS)
    drop = next(c for c in verdict.checks if c.name == "accuracy_drop_pp")
    assert failed(verdict) == {"accuracy_drop_pp"} and drop.value == pytest.approx(3.0)


def test_same_accuracy_but_different_answers_fails_on_agreement():
    latencies = base_latencies()
    labels = [i % 10 for i in range(N)]
    # Both 80% right, on different inputs: 60% agreement.
    stable_pred = [lab if i < 800 else (lab + 1) % 10 for i, lab in enumerate(labels)]
    cand_pred = [lab if i >= 200 else (lab + 1) % 10 for i, lab in enumerate(labels)]
    stable = slot("stable", latencies, predictions=stable_pred)
    verdict = decide(stable, slot("candidate", latencies, predictions=cand_pred), THRESHOLDS)
    assert failed(verdict) == {"agreement"}


def test_a_shifted_confidence_distribution_fails():
    latencies = base_latencies()
    unsure = np.linspace(0.3, 0.7, N)
    verdict = decide(slot("stable", latencies), slot("candidate", latencies, confidences=unsure), THRESHOLDS)
    assert failed(verdict) == {"confidence_ks"}


def test_p95_above_the_slo_fails_even_when_as_slow_as_stable():
    slow = base_latencies() * 40  # p95 ~1.5 s
    verdict = decide(slot("stable", slow), slot("candidate", slow), THRESHOLDS)
    assert failed(verdict) == {"candidate_p95_ms"}


def test_a_candidate_answering_nothing_fails_not_inconclusive():
    stable = slot("stable", base_latencies())
    dead = SlotStats("candidate", requests=N, failures=N, duration_s=10.0)
    verdict = decide(stable, dead, THRESHOLDS)
    assert verdict.verdict == FAIL
    assert {"candidate_error_ratio", "latency_regression", "accuracy_drop_pp"} <= failed(verdict)


def test_verdict_survives_json():
    latencies = base_latencies()
    verdict = decide(slot("stable", latencies), slot("candidate", latencies * 1.5), THRESHOLDS)
    assert GateVerdict.from_dict(json.loads(json.dumps(verdict.to_dict()))) == verdict


@pytest.mark.parametrize(
    ("text", "message"),
    [("min_samples_per_slot: 400\n", "missing"), ("{}\n", "missing"), ("[1, 2]\n", "mapping")],
)
def test_incomplete_thresholds_files_are_refused(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        GateThresholds.from_yaml(path)


def test_unknown_or_negative_thresholds_are_refused(tmp_path):
    values = asdict(THRESHOLDS)
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps({**values, "max_p95_typo": 1}))
    with pytest.raises(ValueError, match="unknown"):
        GateThresholds.from_yaml(path)
    path.write_text(json.dumps({**values, "slo_error_ratio": -0.1}))
    with pytest.raises(ValueError, match="slo_error_ratio"):
        GateThresholds.from_yaml(path)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"model_version": "1", "outputs": []}',
        b'{"model_version": "1", "outputs": [{"name": "logits", "shape": [1, 9], "data": [0,0,0,0,0,0,0,0,0]}]}',
        b'{"model_version": "1", "outputs": [{"name": "logits", "shape": [1, 10], "data": [0,0,0,0,0,0,0,0,0,NaN]}]}',
        b'{"outputs": [{"name": "logits", "shape": [1, 10], "data": [0,0,0,0,0,0,0,0,0,1]}]}',
        b'{"model_version": "1", "outputs": [{"name": "probabilities", "shape": [1, 10], "data": [1,1,1,1,1,1,1,1,1,1]}]}',  # noqa: E501
        b'{"model_version": "1", "outputs": [{"name": "label", "shape": [1], "data": [3]},'
        b' {"name": "probabilities", "shape": [1, 10], "data": [0,1,0,0,0,0,0,0,0,0]}]}',
    ],
)
def test_a_200_with_a_wrong_body_is_a_wrong_answer(body):
    with pytest.raises(WrongAnswer):
        from_rest_answer(body)


def test_both_model_kinds_answers_are_read():
    logits = b'{"model_version": "3", "outputs": [{"name": "logits", "shape": [1, 10], "data": [0,0,0,5,0,0,0,0,0,0]}]}'
    probs = (
        b'{"model_version": "4", "outputs": [{"name": "label", "shape": [1], "data": [7]},'
        b' {"name": "probabilities", "shape": [1, 10], "data": [0,0,0,0,0,0,0,0.9,0.1,0]}]}'
    )
    assert from_rest_answer(logits).predicted == 3 and from_rest_answer(logits).confidence > 0.9
    assert (from_rest_answer(probs).predicted, from_rest_answer(probs).confidence) == (7, pytest.approx(0.9))


def test_the_feed_covers_the_split_evenly_with_unique_bytes():
    feed = DigitFeed(np.array([[0.0, 16.0], [3.0, 0.0]], dtype=np.float32), np.array([0, 1]))
    drawn = [feed.next() for _ in range(6)]
    assert [label for _, _, label in drawn] == [0, 1, 0, 1, 0, 1]
    assert len({row.tobytes() for _, row, _ in drawn}) == 6  # a response cache cannot answer for the model
    assert all(row.min() >= 0 and row.max() <= 16 and row[row == 0].size == 1 for _, row, _ in drawn)


def test_sample_book_pairs_inputs_across_slots():
    book = SampleBook()
    for pair, (slot_name, ok) in enumerate([("stable", True), ("candidate", True), ("candidate", False)]):
        context = {"slot": slot_name, "protocol": "rest-json", "pair": pair // 2, "label": 4}
        if ok:
            context.update(predicted=4, confidence=0.9)
        book.on_request(response_time=5.0, exception=None if ok else RuntimeError("500"), context=context)
    book.on_request(response_time=1.0, context={})  # not a gate request: ignored
    stable, candidate = book.slot_stats("stable"), book.slot_stats("candidate")
    assert (stable.requests, candidate.requests, candidate.failures) == (1, 2, 1)
    assert stable.answers == {0: (4, 4)} and candidate.answers == {0: (4, 4)}


def context(slot_name: str, pair: int, protocol: str = "rest-json", label: int = 4) -> dict:
    return {"slot": slot_name, "protocol": protocol, "pair": pair, "label": label}


def answer(book: SampleBook, slot_name: str, pair: int, ok: bool = True) -> None:
    """Report one finished request to `book` as Locust would."""
    ctx = context(slot_name, pair)
    if ok:
        ctx.update(predicted=4, confidence=0.9)
    book.on_request(response_time=5.0, exception=None if ok else RuntimeError("HTTP 500"), context=ctx)


def test_requests_open_past_the_hang_threshold_fail_their_slot():
    book = SampleBook(hang_s=2.0)
    book.start()
    for pair in range(3):
        book.begin("stable", "grpc", pair, label=4)
        book.begin("candidate", "grpc", pair, label=4)
    answer(book, "stable", 0)
    answer(book, "candidate", 0)
    answer(book, "stable", 1)  # the candidate's request 1 never comes back
    sent = book.open[("candidate", 1)].sent
    # request 2 (both slots) was sent only 0.5 s before the stop: caught by the end, not hung
    book.open[("stable", 2)] = replace(book.open[("stable", 2)], sent=sent + 2.5)
    book.open[("candidate", 2)] = replace(book.open[("candidate", 2)], sent=sent + 2.5)

    hung = book.stop(now=sent + 3.0)

    assert [(s.slot, s.pair, s.ok, s.error) for s in hung] == [("candidate", 1, False, "no answer after 3.0 s")]
    assert hung[0].latency_ms == pytest.approx(3000.0) and hung[0].protocol == "grpc"
    stable, candidate = book.slot_stats("stable"), book.slot_stats("candidate")
    assert (stable.requests, stable.failures, candidate.requests, candidate.failures) == (2, 0, 2, 1)
    assert book.cut == {2} and (stable.unpaired, candidate.unpaired) == (0, 0)
    assert book.failure_reasons("candidate") == {"no answer after 3.0 s": 1}


def test_a_closed_book_ignores_late_answers():
    book = SampleBook(hang_s=2.0)
    book.begin("candidate", "rest-json", 0, label=4)
    book.stop(now=book.open[("candidate", 0)].sent + 10.0)
    answer(book, "candidate", 0)  # the hung request "answers" after the verdict's samples were settled
    assert [(s.ok, s.error) for s in book.samples] == [(False, "no answer after 10.0 s")]


def test_a_request_killed_before_it_was_sent_is_still_counted():
    book = SampleBook(hang_s=2.0)
    book.begin("stable", "rest-binary", 7, label=1)
    book.begin("candidate", "rest-binary", 7, label=1)
    answer(book, "stable", 7)  # the candidate's greenlet was killed before it sent anything
    book.stop(now=book.open[("candidate", 7)].sent + 2.0)
    assert book.slot_stats("candidate").failures == 1 and book.slot_stats("stable").requests == 1


@pytest.mark.parametrize(
    ("timeout_s", "slo_p95_ms", "hang_s"),
    [(10.0, 500.0, 2.0), (10.0, 1500.0, 6.0), (1.0, 500.0, 1.0), (30.0, 100.0, 2.0)],
)
def test_the_hang_threshold_sits_above_healthy_latency_and_below_the_timeout(timeout_s, slo_p95_ms, hang_s):
    assert hang_after_s(timeout_s, slo_p95_ms) == pytest.approx(hang_s)


def test_a_candidate_answering_far_fewer_requests_than_stable_never_passes():
    book = SampleBook()
    for pair in range(1000):
        answer(book, "stable", pair)
        if pair % 2:  # half of the candidate's requests went missing, the rest answered fine
            answer(book, "candidate", pair)
    verdict = decide(book.slot_stats("stable"), book.slot_stats("candidate"), THRESHOLDS)
    paired = next(c for c in verdict.checks if c.name == "requests_paired")
    assert verdict.verdict == FAIL and not paired.passed and paired.value == 500
    assert "1000 stable vs 500 candidate" in paired.detail


def test_a_candidate_dead_after_the_load_fails_and_a_dead_stable_is_inconclusive():
    latencies = base_latencies()
    alive, dead = {"answered_after_load": True}, {"answered_after_load": False, "after_load_detail": "grpc: timed out"}
    stable, candidate = slot("stable", latencies), slot("candidate", latencies)
    verdict = decide(replace(stable, **alive), replace(candidate, **dead), THRESHOLDS)
    assert verdict.verdict == FAIL and failed(verdict) == {"candidate_answers_after_load"}
    assert "grpc: timed out" in verdict.summary
    verdict = decide(replace(stable, **dead), replace(candidate, **alive), THRESHOLDS)
    assert verdict.verdict == INCONCLUSIVE and "stable does not answer after the load" in verdict.summary
    assert decide(replace(stable, **alive), replace(candidate, **alive), THRESHOLDS).verdict == PASS


@pytest.mark.parametrize(
    ("answered_by", "version", "message"),
    [
        ("green", "3", None),
        ("blue", "2", "answered by slot blue (version 2), sent to green (version 3)"),
        ("green", "2", "answered by slot green (version 2), sent to green (version 3)"),
        (None, "3", "answered by a server without X-Canary-Slot (version 3), sent to green (version 3)"),
    ],
)
def test_a_target_knows_who_must_answer_it(answered_by, version, message):
    assert Target("http://nginx:8080", slot="green", model_version="3").wrong_answerer(answered_by, version) == message


def test_targets_carry_slot_and_version_through_the_command_line_and_the_report():
    target = Target("http://nginx:8080", "nginx:50051", {"X-Canary": "always"}, "green", "3")
    args = target.to_args("candidate")
    assert args[args.index("--candidate-slot") + 1] == "green" and args[args.index("--candidate-version") + 1] == "3"
    assert from_args("http://nginx:8080", "nginx:50051", ["X-Canary: always"], "green", "3") == target
    assert target.describe()["slot"] == "green" and target.describe()["model_version"] == "3"
    unchecked = Target("http://nginx:8080")
    assert unchecked.wrong_answerer("blue", "9") is None and "--stable-slot" not in unchecked.to_args("stable")
    leaky = Target("http://nginx:8080", headers={"X-Canary-Force-Token": "s3cret"})
    assert "s3cret" not in json.dumps(leaky.describe())


# -- the gate against the router's contract (real Locust, fake V2 slots) ---------------------


def timeouts_only(slot: dict) -> int:
    """A slot's failures, all of which must be timeouts (a loaded machine), never a refusal."""
    assert all("timed out" in reason for reason in slot["failure_reasons"]), slot["failure_reasons"]
    return int(slot["failures"])


def per_protocol_failures(outcome, slot_name: str) -> dict[str, tuple[int, int]]:
    return {p: (f["requests"], f["failures"]) for p, f in outcome.result["per_protocol"][slot_name].items()}


@pytest.mark.parametrize(
    ("answering", "message"),
    [
        # nginx failed the forced candidate request over to stable: blue answers for green
        ("blue", "answered by slot blue (version 2), sent to green (version 3)"),
        # the right slot, but it still runs the old model
        ("green-old", "answered by slot green (version 2), sent to green (version 3)"),
    ],
)
def test_answers_from_the_wrong_slot_or_model_version_fail_the_gate(tmp_path, answering, message):
    with fake_slot("blue", "2") as blue, fake_slot("green-old", "2", slot_header="green") as green_old:
        wrong = {"blue": blue, "green-old": green_old}[answering]
        stable = fake_target(blue, "never", "blue", "2")
        candidate = fake_target(wrong, "always", "green", "3")
        outcome = fake_gate(stable, candidate, tmp_path / "out")
    assert outcome.exit_code == 1 and outcome.verdict.verdict == FAIL, outcome.verdict.summary
    slots = outcome.result["slots"]
    # Every candidate request failed, as the wrong answerer; on a machine busy enough to
    # time out a 2 s request to a Python fake (seen once in a 20-run loop with three suites
    # on two cores), a timeout is a failure too, never an accepted answer.
    assert timeouts_only(slots["stable"]) <= 0.01 * slots["stable"]["requests"]
    assert slots["candidate"]["failures"] == slots["candidate"]["requests"] > 0
    reasons = dict(slots["candidate"]["failure_reasons"])
    wrong = reasons.pop(message, 0)
    assert wrong >= 0.99 * slots["candidate"]["requests"], slots["candidate"]["failure_reasons"]
    assert all("timed out" in reason for reason in reasons), reasons
    failures = per_protocol_failures(outcome, "candidate")
    assert set(failures) == {"rest-json", "rest-binary", "grpc"}  # the gRPC answer is checked too
    assert all(requests == failed_ > 0 for requests, failed_ in failures.values()), failures
    assert not check(outcome, "candidate_answers_after_load").passed
    assert slots["candidate"]["target"]["slot"] == "green" and slots["candidate"]["target"]["model_version"] == "3"


def spy_on_popen(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """Record the argv and environment of the Locust processes `run_gate` starts."""
    started: list[tuple[list[str], dict[str, str]]] = []
    real_popen = subprocess.Popen

    def popen(argv, *args, **kwargs):
        if "locust" in argv:  # the module is shared: the fake slots start through it too
            started.append((list(argv), dict(kwargs.get("env") or os.environ)))
        return real_popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def infer_requests(fake) -> list[dict]:
    return [r for r in fake.requests() if r["path"] == "ModelInfer" or r["path"].endswith("/infer")]


def test_the_force_token_reaches_both_slots_and_no_command_line(tmp_path, monkeypatch):
    token = "gate-force-0123456789abcdef"
    monkeypatch.setenv(FORCE_TOKEN_ENV, "a-stale-token-of-the-calling-shell")
    started = spy_on_popen(monkeypatch)
    output = io.StringIO()
    with fake_slot("blue", "2") as blue, fake_slot("green", "3") as green:
        stable, candidate = fake_target(blue, "never", "blue", "2"), fake_target(green, "always", "green", "3")
        outcome = fake_gate(stable, candidate, tmp_path / "out", force_token=token, stream=output)
        seen = {"stable": blue.requests(), "candidate": green.requests()}
    # a healthy pair of slots passes: the failures elsewhere in this file are the checks' doing
    assert outcome.exit_code == 0, outcome.verdict.summary if outcome.verdict else outcome.error
    for slot_name, requests in seen.items():
        by_protocol = {p: [r for r in requests if r["protocol"] == p] for p in ("rest", "grpc")}
        assert len(by_protocol["rest"]) > 100 and len(by_protocol["grpc"]) > 50, slot_name
        tokens = {r["headers"].get("x-canary-force-token") for r in requests}
        assert tokens == {token}, f"{slot_name} saw {tokens}"  # REST headers, gRPC metadata, the probe
    [(argv, env)] = started
    assert not any(token in arg for arg in argv) and env[FORCE_TOKEN_ENV] == token
    # the person watching sees the gate's progress and files; Locust's own chatter stays in its log
    printed = output.getvalue()
    assert "gate progress: " in printed and "stable " in printed and "gate result: " in printed, printed
    assert "locust.runners" not in printed and "Aggregated" not in printed, printed
    assert "Aggregated" in (tmp_path / "out" / "locust.log").read_text()
    argv = locust_command(stable, candidate, 4, 24, 24, tmp_path, tmp_path / "t.yaml")
    assert not any(token in arg for arg in argv)
    written = [
        p.read_text(errors="replace")
        for p in (tmp_path / "out").iterdir()
        if p.suffix in (".json", ".md", ".csv", ".log")
    ]
    assert len(written) == 4 and not any(token in text for text in [*written, output.getvalue()])
    assert outcome.result["config"]["force_token"] is True


def test_a_locust_run_by_hand_reads_the_force_token_from_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(FORCE_TOKEN_ENV, raising=False)
    token_file = tmp_path / "force-token"
    token_file.write_text("by-hand-token\n")
    thresholds = fake_thresholds(tmp_path / "thresholds.yaml")
    with fake_slot("blue", "2") as blue, fake_slot("green", "3") as green:
        stable, candidate = fake_target(blue, "never", "blue", "2"), fake_target(green, "always", "green", "3")
        extra = ["--gate-force-token-file", str(token_file), "--gate-thresholds", str(thresholds)]
        code, result = run_locust(stable, candidate, tmp_path / "out", 2, *extra, "--gate-timeout", "2")
        tokens = {r["headers"].get("x-canary-force-token") for r in infer_requests(green) + infer_requests(blue)}
    assert result["verdict"] != "error" and code in (0, 1), result
    assert tokens == {"by-hand-token"}


FREEZE_AT_STOP_LOCUSTFILE = """
import os
import signal

from locust import events

from loadtest.gate_locustfile import *  # noqa: F403 - the real gate, and a candidate that freezes


@events.test_stopping.add_listener  # registered before the gate's own listeners: runs first
def freeze_candidate(**_kwargs):
    os.kill(int(os.environ["GATE_TEST_FREEZE_PID"]), signal.SIGSTOP)
"""


def test_a_candidate_frozen_the_moment_the_load_stops_fails(tmp_path, monkeypatch):
    # Every request of the load got its answer; only the after-load check can see this one.
    locustfile = tmp_path / "freeze_locustfile.py"
    locustfile.write_text(FREEZE_AT_STOP_LOCUSTFILE)
    thresholds = fake_thresholds(tmp_path / "thresholds.yaml")
    with fake_slot("blue", "2") as blue, fake_slot("green", "3") as green:
        monkeypatch.setenv("GATE_TEST_FREEZE_PID", str(green.pid))
        stable, candidate = fake_target(blue, "never", "blue", "2"), fake_target(green, "always", "green", "3")
        extra = ["--gate-thresholds", str(thresholds), "--gate-timeout", str(FAKE_TIMEOUT_S)]
        code, result = run_locust(stable, candidate, tmp_path / "out", FAKE_DURATION_S, *extra, locustfile=locustfile)
    assert (code, result["verdict"]) == (1, FAIL), result.get("summary")
    after_load = next(c for c in result["checks"] if c["name"] == "candidate_answers_after_load")
    assert not after_load["passed"] and result["slots"]["stable"]["answered_after_load"] is True
    assert result["config"]["duration_s"] <= FAKE_DURATION_S + FAKE_TIMEOUT_S + 1.5


KILLED_AT_STOP_LOCUSTFILE = """
import os
import signal

import gevent
from locust import events

from loadtest.gate_locustfile import *  # noqa: F403 - the real gate, with Locust's default stop


@events.test_start.add_listener
def freeze_candidate_a_second_before_the_end(**_kwargs):
    pid = int(os.environ["GATE_TEST_FREEZE_PID"])
    gevent.spawn_later(float(os.environ["GATE_TEST_FREEZE_AFTER_S"]), os.kill, pid, signal.SIGSTOP)


@events.test_stopping.add_listener
def kill_users_mid_request(environment, **_kwargs):
    environment.stop_timeout = 0  # Locust's default: users die with their requests in flight
    environment.canary_gate_run.context.book.hang_s = 0.5  # these requests are ~1 s old
"""


def test_requests_killed_in_flight_at_the_stop_are_failures_not_lost(tmp_path, monkeypatch):
    locustfile = tmp_path / "killed_locustfile.py"
    locustfile.write_text(KILLED_AT_STOP_LOCUSTFILE)
    thresholds = fake_thresholds(tmp_path / "thresholds.yaml")
    with fake_slot("blue", "2") as blue, fake_slot("green", "3") as green:
        monkeypatch.setenv("GATE_TEST_FREEZE_PID", str(green.pid))
        monkeypatch.setenv("GATE_TEST_FREEZE_AFTER_S", str(FAKE_DURATION_S - 1))
        stable, candidate = fake_target(blue, "never", "blue", "2"), fake_target(green, "always", "green", "3")
        extra = ["--gate-thresholds", str(thresholds), "--gate-timeout", "3"]  # longer than the ~1 s they wait
        code, result = run_locust(stable, candidate, tmp_path / "out", FAKE_DURATION_S, *extra, locustfile=locustfile)
    assert (code, result["verdict"]) == (1, FAIL), result.get("summary")
    slots = result["slots"]
    reasons = slots["candidate"]["failure_reasons"]
    assert reasons and all(reason.startswith("no answer after") for reason in reasons), reasons
    assert slots["candidate"]["failures"] == sum(reasons.values()) > 0 and slots["stable"]["failures"] == 0
    assert slots["candidate"]["requests"] == slots["stable"]["requests"]  # every input counted on both sides
    assert next(c for c in result["checks"] if c["name"] == "requests_paired")["passed"]


@pytest.mark.parametrize("fate", ["freeze", "kill"])
def test_a_candidate_that_stops_answering_mid_run_fails_the_gate(tmp_path, fate):
    with fake_slot("blue", "2") as blue, fake_slot("green", "3") as green, ThreadPoolExecutor(1) as pool:
        stable, candidate = fake_target(blue, "never", "blue", "2"), fake_target(green, "always", "green", "3")
        running = pool.submit(fake_gate, stable, candidate, tmp_path / "out")
        # The load is under way once the candidate has answered a hundred inputs (~1 s).
        wait_until(lambda: len(infer_requests(green)) >= 100 or running.done(), 90, "the load to start", 0.05)
        assert not running.done(), running.result().error
        struck = time.monotonic()
        green.freeze() if fate == "freeze" else green.kill()
        outcome = running.result(timeout=120)
        took = time.monotonic() - struck
    assert outcome.exit_code == 1 and outcome.verdict.verdict != PASS, outcome.verdict.summary
    candidate_figures = outcome.result["slots"]["candidate"]
    assert candidate_figures["failures"] > 0 and candidate_figures["answered_after_load"] is False
    # The run ends within its duration plus a request timeout (plus Locust's report writing).
    assert outcome.result["config"]["duration_s"] <= FAKE_DURATION_S + FAKE_TIMEOUT_S + 1.5
    assert took < FAKE_DURATION_S + FAKE_TIMEOUT_S + 20


# -- exit-code contract (real Locust, real Bentos) ------------------------------------------


@pytest.mark.slow
def test_exit_code_0_for_a_healthy_twin(stable_slot, twin_slot, tmp_path):
    code, result = run_locust(stable_slot.target, twin_slot.target, tmp_path, 6)
    assert (code, result["verdict"]) == (0, PASS), result.get("summary")


@pytest.mark.slow
def test_exit_code_1_when_too_little_traffic(stable_slot, twin_slot, tmp_path):
    code, result = run_locust(stable_slot.target, twin_slot.target, tmp_path, 2)
    assert (code, result["verdict"]) == (1, INCONCLUSIVE), result.get("summary")


@pytest.mark.slow
def test_exit_code_2_for_an_unreachable_target(stable_slot, tmp_path):
    from deploy.process import free_port

    nobody = Target(f"http://127.0.0.1:{free_port()}")
    code, result = run_locust(stable_slot.target, nobody, tmp_path, 5, "--gate-protocols", "rest-json")
    assert (code, result["verdict"]) == (2, "error") and "unreachable" in result["error"]
    outcome = run_gate(stable_slot.target, nobody, 5, 2, 2, tmp_path / "run", protocols="rest-json")
    assert (outcome.exit_code, outcome.verdict) == (2, None) and "unreachable" in outcome.error


@pytest.mark.slow
def test_exit_code_2_for_bad_arguments(stable_slot, twin_slot, tmp_path):
    bad = tmp_path / "thresholds.yaml"
    bad.write_text("min_samples_per_slot: 10\n")
    outcome = gate(stable_slot, twin_slot, tmp_path / "a", 5, thresholds_path=bad)
    assert outcome.exit_code == 2 and "missing thresholds" in outcome.error
    rest_only = GateSlot("rest-only", Target(twin_slot.target.rest))
    outcome = gate(stable_slot, rest_only, tmp_path / "b", 5, protocols="grpc")
    assert outcome.exit_code == 2 and "gRPC" in outcome.error


BROKEN_LOCUSTFILE = """
from loadtest.gate_locustfile import *  # noqa: F403 - the real gate, plus one broken user
from loadtest.users import PairedUser


class BrokenUser(PairedUser):
    protocol = "broken"

    def send(self, slot, pair, row, label):
        raise ZeroDivisionError("a bug in the harness")
"""


@pytest.mark.slow
def test_exit_code_2_when_the_harness_raises(stable_slot, twin_slot, tmp_path):
    locustfile = tmp_path / "broken_locustfile.py"
    locustfile.write_text(BROKEN_LOCUSTFILE)
    code, result = run_locust(stable_slot.target, twin_slot.target, tmp_path / "out", 3, locustfile=locustfile)
    assert (code, result["verdict"]) == (2, "error") and "a bug in the harness" in result["error"]


# -- the scenarios (real Locust, real Bentos, real models) ---------------------------


def check(outcome, name: str):
    return next(c for c in outcome.verdict.checks if c.name == name)


@pytest.mark.slow
def test_healthy_twin_passes_three_runs_out_of_three(twin_outcomes):
    summaries = [o.verdict.summary if o.verdict else o.error for o in twin_outcomes]
    assert [o.exit_code for o in twin_outcomes] == [0, 0, 0], summaries
    for outcome in twin_outcomes:
        # Same model, same inputs; not exactly 1.0: a digit batched with other companions can
        # flip a near-tie by a float rounding.
        assert check(outcome, "agreement").value >= 0.99
        report = outcome.report_path.read_text()
        for plot in outcome.plots:
            assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot.name})" in report


@pytest.mark.slow
def test_slower_candidate_fails(canary_home, built_pipeline, stable_slot, twin_outcomes, tmp_path):
    # The injected delay is per model batch, and a request's latency here is mostly HTTP and
    # scheduling, not the model: derive the delay from stable's median under this very load
    # (the twin runs). All of it makes the candidate ~2x slower: 0.3 was too tight, as stable's
    # median moves between runs on a shared machine (a run measured only 1.18x), and 0.5 left
    # too little room above the 1.2x asserted below when the median swings between runs.
    stable_p50 = statistics.median(o.result["slots"]["stable"]["p50_ms"] for o in twin_outcomes)
    delay_ms = max(2.0, round(stable_p50, 1))
    env = {"CANARY_SERVICE_FAULT_LATENCY_MS": str(delay_ms)}
    with gate_slot(canary_home, built_pipeline.bento_tag, "slow", env) as slow:
        outcome = gate(stable_slot, slow, tmp_path)
    assert outcome.exit_code == 1, outcome.verdict.summary
    latency = check(outcome, "latency_regression")
    assert not latency.passed and latency.value >= 1.2, latency.detail  # the scenario: 20%+ slower
    assert check(outcome, "accuracy_drop_pp").passed and check(outcome, "agreement").passed


@pytest.mark.slow
def test_candidate_with_2_percent_errors_fails(canary_home, built_pipeline, stable_slot, tmp_path):
    env = {"CANARY_SERVICE_FAULT_ERROR_RATIO": "0.02"}
    with gate_slot(canary_home, built_pipeline.bento_tag, "errors", env) as errors:
        outcome = gate(stable_slot, errors, tmp_path)
    assert outcome.exit_code == 1, outcome.verdict.summary
    assert not check(outcome, "error_ratio_increase").passed
    assert 0 < outcome.result["slots"]["candidate"]["error_ratio"] < 0.05
    assert check(outcome, "accuracy_drop_pp").passed and check(outcome, "agreement").passed


@pytest.mark.slow
def test_less_accurate_candidate_fails_and_is_logged_to_its_model_version(
    canary_home, built_pipeline, stable_slot, worse_model, stable_accuracy, tmp_path
):
    assert stable_accuracy - worse_model.test_accuracy >= 0.03  # genuinely 3+ points worse
    env = {"CANARY_SERVICE_MODEL_TAG": worse_model.model_tag}
    with gate_slot(canary_home, built_pipeline.bento_tag, "worse", env) as worse:
        outcome = gate(stable_slot, worse, tmp_path)
    assert outcome.exit_code == 1, outcome.verdict.summary
    drop = check(outcome, "accuracy_drop_pp")
    assert not drop.passed and drop.value >= 3.0, drop.detail

    from mlflow.tracking import MlflowClient

    client = MlflowClient(canary_home.mlflow_uri)
    uri = log_to_mlflow(outcome, canary_home.registered_model, worse_model.version, client)
    version = client.get_model_version(canary_home.registered_model, str(worse_model.version))
    folder = uri.split(f"runs:/{version.run_id}/", 1)[1]
    logged = {Path(a.path).name for a in client.list_artifacts(version.run_id, folder)}
    assert logged == {"result.json", "report.md", "latency.png", "timeline.png"}
    assert version.tags["gate.verdict"] == FAIL and "accuracy_drop_pp" in version.tags["gate.summary"]
    assert version.tags["gate.report"] == f"{uri}/report.md"

"""The promotion gate: its verdict rules on synthetic samples, its exit-code contract with
short real Locust runs, and the issue's four scenarios against real served Bentos."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from loadtest.gate import FAIL, INCONCLUSIVE, PASS, GateThresholds, GateVerdict, SlotStats, decide
from loadtest.results import exit_code_for
from loadtest.run_gate import log_to_mlflow, run_gate
from loadtest.samples import DigitFeed, SampleBook
from loadtest.targets import Target
from loadtest.v2codec import WrongAnswer, from_rest_answer
from tests.support.gate_fixtures import GateSlot, gate, gate_slot, run_locust

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
    # (the twin runs). Half of it makes the candidate ~1.5x slower; 0.3 was too tight, as
    # stable's median moves between runs on a shared machine (a run measured only 1.18x).
    stable_p50 = statistics.median(o.result["slots"]["stable"]["p50_ms"] for o in twin_outcomes)
    delay_ms = max(2.0, round(0.5 * stable_p50, 1))
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

"""What the load-test users check and how they name and count requests, without Locust:
the shared answer checks (loadtest/answers.py), the request names the charts split by,
the accuracy table, and the locustfile's own options (loadtest/load_options.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from loadtest.accuracy import AccuracyBook
from loadtest.answers import from_native_answer, judge_rest, to_native_body
from loadtest.load_options import LoadSetupError, build_target, check_options, grpc_address, parse_weights
from loadtest.targets import FORCE_TOKEN_ENV, Target, answering_slot, request_name
from loadtest.v2codec import WrongAnswer

LOGITS = {"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": [0, 0, 0, 5, 0, 0, 0, 0, 0, 0]}


def v2_body(version: str | None = "3") -> bytes:
    return json.dumps({"model_version": version, "outputs": [LOGITS]}).encode()


def test_an_answer_counts_only_as_a_200_with_a_classification_from_the_named_slot():
    anyone, blue_v3 = Target("http://x"), Target("http://x", slot="blue", model_version="3")
    assert judge_rest(200, v2_body(), None, anyone).predicted == 3
    assert judge_rest(200, v2_body(), "blue", blue_v3).model_version == "3"
    with pytest.raises(WrongAnswer, match="HTTP 503"):
        judge_rest(503, b"", "blue", anyone)
    with pytest.raises(WrongAnswer, match="no model version"):
        judge_rest(200, v2_body(None), "blue", anyone)
    with pytest.raises(WrongAnswer, match="answered by slot green"):
        judge_rest(200, v2_body(), "green", blue_v3)
    with pytest.raises(WrongAnswer, match="version 4"):
        judge_rest(200, v2_body("4"), "blue", blue_v3)


def test_the_native_api_is_encoded_for_one_row_and_its_answer_checked():
    row = np.arange(64, dtype=np.float32) / 4
    assert json.loads(to_native_body(row)) == {"pixels": [row.tolist()]}
    good = b'{"model_version": "2", "classes": [7], "confidences": [0.93]}'
    prediction = judge_rest(200, good, "blue", Target("http://x"), parse=from_native_answer)
    assert (prediction.predicted, prediction.model_version) == (7, "2")
    for bad, why in [
        (b'{"model_version": "", "classes": [7], "confidences": [0.9]}', "no model version"),
        (b'{"model_version": "2", "classes": [12], "confidences": [0.9]}', "not a digit"),
        (b'{"model_version": "2", "classes": [7], "confidences": [0.05]}', "top probability"),
        (b'{"model_version": "2", "classes": [7, 1], "confidences": [0.9, 0.8]}', "for one row"),
        (b'{"model_version": "2"}', "malformed"),
        (b"<html>", "malformed"),
    ]:
        with pytest.raises(WrongAnswer, match=why):
            from_native_answer(bad)


def test_requests_are_named_by_protocol_slot_and_version():
    assert request_name("grpc", "green", "4") == "grpc green v4"
    assert request_name("rest-json", None, None) == "rest-json ? v?"
    assert answering_slot("native blue v3") == "blue" and answering_slot("rest-json ? v?") == "?"


def test_accuracy_is_counted_per_name_and_merged_from_workers(tmp_path):
    master, worker = AccuracyBook(), AccuracyBook()
    for label, predicted in [(1, 1), (2, 2), (3, 5), (4, 4)]:
        worker.add("rest-json blue v1", label, predicted)
    worker.add("grpc green v2", 9, 9)
    master.merge(worker.drain())
    assert worker.drain() == {}
    master.merge({"rest-json blue v1": [1, 1]})
    assert master.rows() == [("grpc green v2", 1, 1, 1.0), ("rest-json blue v1", 4, 5, 0.8)]
    assert "80.00%" in master.table()
    master.write_csv(tmp_path / "accuracy.csv")
    assert (tmp_path / "accuracy.csv").read_text().splitlines()[2] == "rest-json blue v1,4,5,0.8000"


def test_weights_select_protocols_and_bad_ones_are_refused():
    assert parse_weights("rest-json=3, grpc") == {"rest-json": 3, "rest-binary": 0, "grpc": 1, "native": 0}
    for text, why in [("soap=1", "unknown protocol"), ("grpc=x", "whole number"), ("grpc=0", "no protocol")]:
        with pytest.raises(LoadSetupError, match=why):
            parse_weights(text)


def options(**overrides) -> SimpleNamespace:
    values = {"grpc_host": "", "weights": "rest-json=1", "user_rate": 0.0, "request_timeout": 5.0, "force": "",
              "expect_slot": "", "expect_version": ""}  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


def test_the_grpc_address_defaults_to_the_stacks_nginx_port(monkeypatch):
    monkeypatch.delenv("CANARY_STACK_NGINX_GRPC_PORT", raising=False)
    assert grpc_address(options(), "http://10.0.0.5:8080") == "10.0.0.5:8081"
    monkeypatch.setenv("CANARY_STACK_NGINX_GRPC_PORT", "9191")
    assert grpc_address(options(), "http://localhost:8080") == "localhost:9191"
    assert grpc_address(options(grpc_host="g:1"), "http://localhost:8080") == "g:1"


def test_forcing_sends_the_header_and_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv(FORCE_TOKEN_ENV, "s3cret")
    target = build_target(options(force="always", expect_slot="green", expect_version="4"), "http://h:1")
    assert dict(target.headers) == {"X-Canary": "always", "X-Canary-Force-Token": "s3cret"}
    assert (target.slot, target.model_version) == ("green", "4")
    assert dict(build_target(options(), "http://h:1").headers) == {}


def test_bad_options_are_refused_before_any_traffic():
    for bad, why in [
        (options(user_rate=-1.0), "user-rate"),
        (options(request_timeout=0.0), "request-timeout"),
        (options(grpc_host="no-port"), "host:port"),
    ]:
        with pytest.raises(LoadSetupError, match=why):
            check_options(bad, "http://h:1")
    with pytest.raises(LoadSetupError, match="http"):
        check_options(options(), "ftp://h")
    with pytest.raises(LoadSetupError, match="--host"):
        build_target(options(), None)

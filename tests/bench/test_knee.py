"""`python -m bench.knee`'s pure parts: which bench figure it compares with, the Locust
command it runs, and the comparison. The run itself (a server, minutes of load) is `make knee`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench.knee import LOCUSTFILE, compare, locust_argv, saturated_rps


def measurement(model: str, contender: str, protocol: str, mode: str, rps: float) -> dict:
    return {"model": model, "contender": contender, "protocol": protocol, "mode": mode, "rps": rps}


def test_the_knee_is_compared_with_the_saturated_nginx_rest_json_figure_of_its_model(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"measurements": [
        measurement("digits-heavy", "bento", "rest-json", "saturated", 372.0),
        measurement("digits-heavy", "bento-nginx", "rest-json", "fixed", 67.0),
        measurement("digits-heavy", "bento-nginx", "grpc", "saturated", 300.0),
        measurement("digits-cnn", "bento-nginx", "rest-json", "saturated", 5700.0),
        measurement("digits-heavy", "bento-nginx", "rest-json", "saturated", 368.0),
    ]}))  # fmt: skip
    assert saturated_rps(report, "digits-heavy") == 368.0
    assert saturated_rps(report, "digits-cnn") == 5700.0
    assert saturated_rps(tmp_path / "missing.json", "digits-heavy") is None


@pytest.mark.parametrize(
    ("knee", "bench", "within"),
    [(300.0, 368.0, True), (250.0, 368.0, False), (470.0, 368.0, True), (None, 368.0, None)],
)
def test_within_30_percent_either_way(knee, bench, within):
    result = compare({"capacity_rps": knee}, bench)
    assert result["within_30_percent"] is within
    assert compare({"capacity_rps": knee}, None)["within_30_percent"] is None


def test_locust_runs_the_rest_json_user_flat_out_with_the_knee_shape(tmp_path):
    args = SimpleNamespace(start_users=4, step_users=4, step_s=15.0, max_users=96, p99_ms=150.0, fail_ratio=0.01)
    argv = locust_argv("http://127.0.0.1:9", args, tmp_path)
    assert argv[argv.index("-f") + 1] == str(LOCUSTFILE) and argv[-1] == "V2RestJsonUser"
    assert argv[argv.index("--user-rate") + 1] == "0" and argv[argv.index("--weights") + 1] == "rest-json=1"
    assert argv[argv.index("--knee-p99-ms") + 1] == "150.0" and argv[argv.index("--knee-max-users") + 1] == "96"
    assert argv[argv.index("--knee-out") + 1] == str(tmp_path / "knee.json")

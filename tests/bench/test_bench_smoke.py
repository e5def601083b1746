"""The benchmark's pure parts (bench): wrk parsing, the report arithmetic on recorded
numbers, and the hand-written FastAPI contender answering one real request in-process.

No training, no servers, no load: the whole benchmark is `python -m bench`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.report import markdown_table
from bench.results import (
    CACHE_HIT,
    FIXED,
    SATURATED,
    Measurement,
    build_table,
    cache_results,
    fixed_rate,
    judge_targets,
)
from bench.wrk import RESULT_PREFIX, lua_script, parse_wrk_output

pytestmark = pytest.mark.slow

# Recorded from a wrk 4.1.0 run of the Bento (digits-cnn, V2 REST JSON, 8 connections).
WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:50695/v2/models/digits/infer
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    13.31ms   14.93ms 119.15ms   95.36%
    Req/Sec   751.16    150.83     0.96k    73.68%
  Latency Distribution
     50%    9.92ms
     75%   11.80ms
     90%   14.79ms
     99%  105.48ms
  1466 requests in 2.00s, 648.53KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:    732.20
Transfer/sec:    323.91KB
"""
WRK_JSON = (
    RESULT_PREFIX + '{"requests":1466,"duration_us":2002178,"bytes":664098,'
    '"errors":{"connect":0,"read":2,"write":0,"status":7,"timeout":1},'
    '"latency_us":{"p50":9922,"p90":14787,"p99":105476,"p999":118695,"max":119152,"mean":13314.5},'
    '"statuses":{"200":1459,"503":7}}\n'
)


def test_wrk_summary_line_gives_counts_percentiles_and_statuses():
    result = parse_wrk_output(WRK_OUTPUT + WRK_JSON)
    assert result.requests == 1466
    assert result.rps == pytest.approx(1466 / 2.002178)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == pytest.approx((9.922, 105.476, 119.152))
    assert result.statuses == {"200": 1459, "503": 7}
    assert result.non_2xx == 7 and result.socket_errors == 3 and result.errors == 10


def test_wrk_plain_text_is_parsed_when_the_script_printed_nothing():
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.requests == 1466 and result.duration_s == pytest.approx(2.0)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == pytest.approx((9.92, 14.79, 105.48))
    assert result.max_ms == pytest.approx(119.15)
    assert (result.non_2xx, result.socket_errors) == (7, 3)


def test_wrk_text_in_microseconds_and_seconds():
    text = WRK_OUTPUT.replace("9.92ms", "812.00us").replace("105.48ms", "1.20s").replace("2.00s,", "1.00m,")
    result = parse_wrk_output(text)
    assert result.p50_ms == pytest.approx(0.812) and result.p99_ms == pytest.approx(1200.0)
    assert result.duration_s == pytest.approx(60.0)


def test_not_wrk_output_is_refused():
    with pytest.raises(ValueError, match="not wrk output"):
        parse_wrk_output("unable to connect to 127.0.0.1:9 Connection refused")


def test_only_the_fixed_load_script_paces_requests():
    assert "function delay()" in lua_script(paced=True)
    assert "function delay()" not in lua_script(paced=False)
    assert RESULT_PREFIX in lua_script(paced=False) and "%%" not in lua_script(paced=True)


def _m(
    model, contender, kind, protocol, mode, requests, p50=5.0, p99=12.0, statuses=None, baseline=None
) -> Measurement:
    return Measurement(
        model=model, contender=contender, label=contender, kind=kind, protocol=protocol, mode=mode,
        connections=32 if mode != FIXED else 16, rows_per_request=1, requests=requests, duration_s=10.0,
        p50_ms=p50, p90_ms=p50 * 1.5, p99_ms=p99, max_ms=p99 * 2, errors=sum((statuses or {}).values()),
        statuses=statuses or {}, offered_rps=120.0 if mode == FIXED else None, loadgen_cpu_share=0.04,
        server_cpu_share=0.9, baseline=baseline,
    )  # fmt: skip


# Saturated requests/s shaped like a real 2-core run: HTTP-bound digits-cnn, compute-bound digits-heavy.
RECORDED = [
    _m("digits-cnn", "bento", "project", "rest-json", SATURATED, 7_320),
    _m("digits-cnn", "bento", "project", "grpc", SATURATED, 7_720),
    _m("digits-cnn", "bento-nginx", "project", "rest-json", SATURATED, 6_000, baseline="bento"),
    _m("digits-cnn", "bentoml-plain", "alternative", "rest-json", SATURATED, 5_610),
    _m("digits-cnn", "fastapi", "alternative", "rest-json", SATURATED, 20_540),
    _m("digits-cnn", "mlflow", "alternative", "rest-json", SATURATED, 3_660),
    _m("digits-heavy", "bento", "project", "rest-json", SATURATED, 2_350),
    _m("digits-heavy", "fastapi", "alternative", "rest-json", SATURATED, 2_560),
    _m("digits-heavy", "mlflow", "alternative", "rest-json", SATURATED, 690),
    _m("digits-cnn", "bento", "project", "rest-json", FIXED, 1_830, p50=5.2, p99=82.9, statuses={"503": 2}),
    _m("digits-cnn", "bento", "project", "grpc", FIXED, 1_830, p50=5.1, p99=11.0),
    _m("digits-heavy", "bento", "project", "rest-json", FIXED, 345, p50=9.3, p99=18.9),
    _m("digits-heavy", "bento", "project", "rest-json", CACHE_HIT, 5_200),
]
LIMITS = {"digits-cnn": 240_758.0, "digits-heavy": 379.0}


def test_fixed_load_is_half_the_slowest_saturation():
    heavy = [m for m in RECORDED if m.model == "digits-heavy"]
    assert fixed_rate(heavy, 0.5) == pytest.approx(0.5 * 69.0)
    assert fixed_rate([], 0.5) == 0.0


def test_table_ratios_against_the_best_alternative_the_limit_and_the_baseline():
    table = {(r.model, r.contender, r.protocol): r for r in build_table(RECORDED, LIMITS)}
    assert len(table) == 9  # one row per saturated (model, contender, protocol)
    grpc = table["digits-cnn", "bento", "grpc"]
    assert grpc.vs_best_alternative == pytest.approx(772 / 2054)
    assert grpc.vs_limit == pytest.approx(772 / 240_758)
    assert table["digits-cnn", "fastapi", "rest-json"].vs_best_alternative == pytest.approx(1.0)
    assert table["digits-cnn", "bento-nginx", "rest-json"].vs_baseline == pytest.approx(600 / 732)
    rest = table["digits-cnn", "bento", "rest-json"]
    assert (rest.p50_ms, rest.p99_ms, rest.fixed_rps, rest.unavailable_fixed) == (5.2, 82.9, 183.0, 2)
    assert table["digits-cnn", "mlflow", "rest-json"].p50_ms is None  # no fixed-load run recorded
    assert table["digits-heavy", "bento", "rest-json"].vs_limit == pytest.approx(235 / 379)


def test_targets_are_judged_from_the_ratios():
    table = build_table(RECORDED, LIMITS)
    cache = cache_results(RECORDED, {"digits-heavy": (52_000, 1)})
    assert cache[0].ratio == pytest.approx(520 / 235)
    verdicts = {t.name: t for t in judge_targets(table, cache)}
    assert verdicts["digits-heavy throughput vs best alternative"].passed is False
    assert verdicts["digits-heavy fp32 throughput vs its in-process limit"].value == pytest.approx(235 / 379)
    assert verdicts["digits-heavy int8 throughput vs its in-process limit"].passed is None  # no int8 row
    assert (
        verdicts["digits-cnn throughput vs best alternative"].detail
        == "best project path: bento grpc; best alternative: fastapi rest-json"
    )
    assert verdicts["cache hits vs misses (digits-heavy)"].passed is False
    assert verdicts["nginx in front: share of direct throughput"].passed is False  # 0.82 < 0.85
    assert verdicts["p99 / p50 at the fixed load (worst project row)"].value == pytest.approx(82.9 / 5.2)
    assert verdicts["503 / UNAVAILABLE below saturation (project rows)"].passed is False


def test_server_cpu_per_request_sizes_the_scale_out():
    """CPU-seconds per 1,000 requests come from the saturated window's server CPU; the
    scale-out table turns them into cores for 10,000 requests/s (project rows only)."""
    from dataclasses import replace

    from bench.report import markdown_scale_out

    busy = replace(RECORDED[0], server_cpu_s=9.0)  # 9 CPU-s for 7,320 requests
    table = build_table([busy, *RECORDED[1:]], LIMITS)
    row = next(r for r in table if (r.contender, r.protocol) == ("bento", "rest-json") and r.model == "digits-cnn")
    assert row.server_cpu_s_per_1k == pytest.approx(9_000 / 7_320)
    assert row.cores_for(10_000) == pytest.approx(10 * 9_000 / 7_320)
    text = markdown_scale_out(table)
    assert "| digits-cnn | bento | rest-json | 1.23 | 12.3 | 14 |" in text  # 10,000 / 732 req/s -> 14 slots
    assert "fastapi" not in text  # alternatives are not sized
    assert next(r for r in table if r.protocol == "grpc").server_cpu_s_per_1k is None  # no CPU recorded: no claim


def test_the_int8_row_is_judged_against_fp32_alternatives_and_its_own_limit():
    """An int8 export counts as a project path for the heavy targets: throughput against the
    fp32 alternatives (what a user would otherwise run), compute share against the int8 graph's
    own in-process limit (not the fp32 one it can exceed)."""
    int8 = _m("digits-heavy", "bento-int8", "project", "rest-json", SATURATED, 6_000)
    table = build_table([*RECORDED, int8], {**LIMITS, "digits-heavy:int8": 800.0})
    row = next(r for r in table if r.contender == "bento-int8")
    assert row.vs_limit == pytest.approx(600 / 800)
    assert row.vs_best_alternative == pytest.approx(600 / 256)
    verdicts = {t.name: t for t in judge_targets(table, [])}
    heavy = verdicts["digits-heavy throughput vs best alternative"]
    assert heavy.passed is True and heavy.detail.startswith("best project path: bento-int8 rest-json")
    assert verdicts["digits-heavy int8 throughput vs its in-process limit"].value == pytest.approx(0.75)


def test_issue16_targets_grpc_against_its_own_rest_and_the_slot_against_the_v2_peers():
    """gRPC is judged against the same slot's best REST row (1 and 2 workers apart), the
    one-worker slot against the best V2 peer of the same protocol family; the 2-worker int8 slot
    counts for the int8 share of the limit, and a 2-worker row is never "nginx in front"."""
    rows = [
        *RECORDED,
        _m("digits-cnn", "bento-2w", "project", "rest-json", SATURATED, 9_000, baseline="bento"),
        _m("digits-cnn", "bento-2w", "project", "grpc", SATURATED, 5_600, baseline="bento"),
        _m("digits-cnn", "kserve", "alternative", "rest-json", SATURATED, 1_200),
        _m("digits-cnn", "kserve", "alternative", "grpc", SATURATED, 8_000),
        _m("digits-cnn", "mlserver", "alternative", "grpc", SATURATED, 900),
        _m("digits-cnn", "grpc-ceiling", "ceiling", "grpc", SATURATED, 30_000),
        _m("digits-heavy", "bento-int8", "project", "rest-json", SATURATED, 5_000),
        _m("digits-heavy", "bento-int8-2w", "project", "rest-json", SATURATED, 6_400, baseline="bento-int8"),
    ]
    table = build_table(rows, {**LIMITS, "digits-heavy:int8": 800.0})
    verdicts = {t.name: t for t in judge_targets(table, [])}
    one = verdicts["digits-cnn gRPC calls/s vs the same slot's REST req/s (1 worker)"]
    assert one.value == pytest.approx(7_720 / 7_320) and one.passed is True
    assert one.detail.endswith("grpc.aio with an empty handler: 3,000 calls/s, this gRPC path 26% of it")
    two = verdicts["digits-cnn gRPC calls/s vs the same slot's REST req/s (2 workers)"]
    assert two.value == pytest.approx(5_600 / 9_000) and two.passed is True
    rest = verdicts["digits-cnn V2 REST: one worker vs the best V2 peer"]
    assert rest.value == pytest.approx(7_320 / 1_200) and rest.passed is True
    grpc = verdicts["digits-cnn V2 gRPC: one worker vs the best V2 peer"]
    assert grpc.value == pytest.approx(7_720 / 8_000) and grpc.passed is False
    assert grpc.detail == "bento grpc vs kserve grpc"  # the ceiling is never an alternative to beat
    ours = next(r for r in table if (r.model, r.contender, r.protocol) == ("digits-cnn", "bento", "grpc"))
    assert ours.vs_best_alternative == pytest.approx(772 / 2054)  # fastapi's 2,054, not the ceiling's 3,000
    assert verdicts["digits-heavy V2 REST: one worker vs the best V2 peer"].passed is None  # no peer ran
    int8 = verdicts["digits-heavy int8 throughput vs its in-process limit"]
    assert int8.value == pytest.approx(640 / 800) and "bento-int8-2w" in int8.detail
    assert verdicts["nginx in front: share of direct throughput"].detail == "bento-nginx rest-json"


def test_report_files_carry_the_table_the_stamp_and_a_chart(tmp_path):
    from bench.report import build_report, render_markdown, write_report

    table = build_table(RECORDED, LIMITS)
    cache = cache_results(RECORDED, {"digits-heavy": (52_000, 1)})
    targets = judge_targets(table, cache)
    limits = {m: {"samples_per_s": v, "batch": 64, "threads": 2} for m, v in LIMITS.items()}
    config = {"workers": 1, "quick": False, "connections": 32, "grpc_processes": 2, "duration_s": 10.0,
              "warmup_s": 2.0, "fixed_connections": 16, "fixed_fraction": 0.5}  # fmt: skip
    machine = {"cpu_model": "AMD EPYC", "cores": 2}
    versions = {"python": "3.11.7", "bentoml": "1.4.39", "onnxruntime": "1.31.1", "torch": "2.13.0", "mlflow": "3.17.2"}
    report = build_report(
        config, machine, versions, "2026-11-22T06:00:00+00:00", limits, RECORDED, table, cache, targets, [], []
    )
    markdown = render_markdown(report, table, cache, targets)
    assert "| **bento** | grpc | 772 | 772 | 5.1 | 11.0 | 183 | 0 | 0.38x | 0.3% | - | 4% | 0% |" in markdown
    assert "| digits-heavy | 235 | 520 | 2.21x | 52,000 |" in markdown
    assert "AMD EPYC, 2 cores" in markdown and "bentoml 1.4.39" in markdown
    paths = write_report(tmp_path, report, markdown, table)
    written = json.loads(paths["json"].read_text())
    assert written["versions"]["onnxruntime"] == "1.31.1" and len(written["table"]) == 9
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick_shrinks_every_run():
    from bench.__main__ import parse_args

    quick = parse_args(["--quick", "--only", "bento", "fastapi", "--workers", "2"])
    full = parse_args([])
    assert quick.duration_s < full.duration_s and quick.connections < full.connections
    assert quick.contenders == ("bento", "fastapi") and quick.workers == 2
    with pytest.raises(SystemExit):
        parse_args(["--workers", "0"])


def test_service_settings_reach_the_project_servers_and_the_report_stamp(tmp_path, capsys):
    """`--service SETTING=VALUE` is how a run changes a service setting (CANARY_SERVICE_* in the
    environment are stripped): it becomes the servers' variable and is stamped in the report; a
    setting the service does not have is refused, not silently measured as the default."""
    from bench.__main__ import parse_args
    from bench.prepare import BenchHome
    from bench.runner import BenchRun

    config = parse_args(
        ["--service", "grpc_transport=grpcio", "--service", "MAX_LATENCY_MS=0", "--home", str(tmp_path)]
    )
    assert config.service_settings == (("grpc_transport", "grpcio"), ("max_latency_ms", "0"))
    context = BenchRun(config, BenchHome(home=tmp_path), print).context(np.zeros((1, 64), np.float32))
    assert context.extra_env == {"CANARY_SERVICE_GRPC_TRANSPORT": "grpcio", "CANARY_SERVICE_MAX_LATENCY_MS": "0"}
    assert config.as_dict()["service_settings"] == (("grpc_transport", "grpcio"), ("max_latency_ms", "0"))
    for bad in ("grpc_transprt=grpcio", "grpc_transport", "=lean"):
        with pytest.raises(SystemExit):
            parse_args(["--service", bad])
    assert "no setting 'grpc_transprt'" in capsys.readouterr().err


def test_fastapi_contender_answers_a_real_digit(tmp_path):
    import onnxruntime as ort
    from fastapi.testclient import TestClient

    from bench.alternatives.fastapi_app import create_app
    from bench.payloads import sample_rows, to_v2_json
    from tests.support.tiny_model import write_tiny_onnx

    model = tmp_path / "model.onnx"
    write_tiny_onnx(model)
    rows = sample_rows(2)
    payload = to_v2_json(rows)
    with TestClient(create_app(str(model))) as client:
        answer = client.post(
            "/v2/models/digits/infer", content=payload.body, headers={"Content-Type": payload.content_type}
        )
    assert answer.status_code == 200
    output = answer.json()["outputs"][0]
    assert output["name"] == "logits" and output["shape"] == [2, 10]
    expected = ort.InferenceSession(str(model)).run(None, {"input": rows})[0]
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(2, 10), expected, rtol=1e-5)
    assert not math.isnan(sum(output["data"]))


def test_the_prediction_log_row_is_judged_against_log_off_and_is_no_nginx_front():
    logged = _m("digits-cnn", "bento-predlog", "project", "rest-json", SATURATED, 6_900, baseline="bento")
    table = build_table([*RECORDED, logged], LIMITS)
    verdicts = {t.name: t for t in judge_targets(table, [])}
    target = verdicts[
        "prediction log, drift and shadow diff on: share of throughput with them off (digits-cnn V2 REST JSON)"
    ]
    assert target.value == pytest.approx(690 / 732) and target.passed is True
    assert verdicts["nginx in front: share of direct throughput"].value == pytest.approx(600 / 732)
    assert "(0.94x of them off)" in markdown_table(table, {})


def test_the_features_cost_measured_in_turns_is_preferred_to_the_table_row():
    from bench.live_traffic import InTurns

    logged = _m("digits-cnn", "bento-predlog", "project", "rest-json", SATURATED, 6_900, baseline="bento")
    turns = InTurns(off=(1000.0, 1200.0), log_drift=(990.0, 1100.0), all_on=(880.0, 1100.0), seconds=10)
    assert turns.ratio == pytest.approx(1980 / 2200) and turns.log_drift_ratio == pytest.approx(2090 / 2200)
    name = "prediction log, drift and shadow diff on: share of throughput with them off (digits-cnn V2 REST JSON)"
    target = {t.name: t for t in judge_targets(build_table([*RECORDED, logged], LIMITS), [], turns.ratio)}[name]
    assert target.value == pytest.approx(0.9) and target.passed is True and "in turns" in target.detail
    assert "1,000/990/880, 1,200/1,100/1,100" in turns.markdown() and "all three / off = **0.90**" in turns.markdown()

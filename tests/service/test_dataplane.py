"""The data plane against a real `bentoml serve`: existing V2 clients unchanged, shared
batching across protocols, the Redis cache, metrics, and overload made explicit."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from models.data import load_split
from tests.support.metrics import scrape, total
from tests.support.pipeline import REST_LISTENERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def reference_logits(built_pipeline, split):
    import bentoml

    stored = bentoml.models.get(f"digits:v{built_pipeline.version}")
    session = ort.InferenceSession(stored.path_of("model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": split.x_test})[0]


def host_port(url: str) -> str:
    return url.removeprefix("http://")


@pytest.mark.parametrize("listener", REST_LISTENERS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_gets_the_in_process_predictions(serving, split, reference_logits, binary, listener):
    client = triton_http.InferenceServerClient(host_port(serving.rest(listener)))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    for start in range(0, len(split.x_test), 120):
        rows = split.x_test[start : start + 120]
        request = triton_http.InferInput("input", list(rows.shape), "FP32")
        request.set_data_from_numpy(rows, binary_data=binary)
        wanted = triton_http.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("digits", [request], outputs=[wanted])
        np.testing.assert_allclose(
            result.as_numpy("logits"), reference_logits[start : start + 120], rtol=1e-5, atol=1e-5
        )
    client.close()


def test_tritonclient_grpc_gets_the_in_process_predictions(serving, split, reference_logits, built_pipeline):
    client = triton_grpc.InferenceServerClient(serving.grpc)
    assert client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["versions"] == [str(built_pipeline.version)]
    request = triton_grpc.InferInput("input", list(split.x_test.shape), "FP32")
    request.set_data_from_numpy(split.x_test)
    result = client.infer("digits", [request])
    np.testing.assert_allclose(result.as_numpy("logits"), reference_logits, rtol=1e-5, atol=1e-5)
    assert result.get_response().model_version == str(built_pipeline.version)
    client.close()


def test_rest_and_grpc_requests_share_batches(second_version, split):
    """16 one-row requests (8 REST, 8 gRPC) sent at once inside a 400 ms batching window:
    a batch holding more than 8 requests must have mixed the protocols."""
    before = scrape(second_version.url)
    barrier = threading.Barrier(16)
    rows = split.x_test[:16]

    # Every client connects before the barrier, so the 16 calls leave together even on a
    # loaded machine (a connection set up after it could miss the window).
    def rest(i: int) -> int:
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": rows[i].tolist()}]}
        with httpx.Client(base_url=second_version.url, timeout=30) as client:
            assert client.get("/v2/health/ready").status_code == 200
            barrier.wait()
            return client.post("/v2/models/digits/infer", json=body).status_code

    def grpc(i: int) -> int:
        client = triton_grpc.InferenceServerClient(second_version.grpc)
        request = triton_grpc.InferInput("input", [1, 64], "FP32")
        request.set_data_from_numpy(rows[i : i + 1])
        assert client.is_server_ready()
        barrier.wait()
        client.infer("digits", [request])
        client.close()
        return 200

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: rest(i) if i < 8 else grpc(i), range(16)))
    assert statuses == [200] * 16
    after = scrape(second_version.url)
    batches = total(after, "canary_batch_requests_count") - total(before, "canary_batch_requests_count")
    small = total(after, "canary_batch_requests_bucket", le="8.0") - total(
        before, "canary_batch_requests_bucket", le="8.0"
    )
    assert batches - small >= 1, "no batch held more than 8 requests"
    assert (
        total(after, "canary_requests_total", protocol="grpc") - total(before, "canary_requests_total", protocol="grpc")
        == 8
    )


def test_cache_hit_after_miss_and_a_miss_for_another_version(serving, second_version, split):
    rows = split.x_test[200:203] * 0.5 + 0.25  # inputs no other test sends
    body = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": rows.tolist()}]}

    def events(url: str) -> tuple[float, float]:
        samples = scrape(url)
        return total(samples, "canary_cache_events_total", kind="hit"), total(
            samples, "canary_cache_events_total", kind="miss"
        )

    hits0, misses0 = events(serving.url)
    first = httpx.post(f"{serving.url}/v2/models/digits/infer", json=body, timeout=30).raise_for_status().json()
    hits1, misses1 = events(serving.url)
    second = httpx.post(f"{serving.url}/v2/models/digits/infer", json=body, timeout=30).json()
    hits2, misses2 = events(serving.url)
    assert (hits1 - hits0, misses1 - misses0) == (0, 1)
    assert (hits2 - hits1, misses2 - misses1) == (1, 0)
    assert first["outputs"] == second["outputs"]

    other_hits0, other_misses0 = events(second_version.url)
    other = httpx.post(f"{second_version.url}/v2/models/digits/infer", json=body, timeout=30).json()
    other_hits1, other_misses1 = events(second_version.url)
    assert other["model_version"] == str(second_version.version)
    assert (other_hits1 - other_hits0, other_misses1 - other_misses0) == (0, 1)
    assert [o["name"] for o in other["outputs"]] == ["label", "probabilities"]


def test_overload_is_a_503_with_retry_after_and_counted(second_version, split):
    """Queue of 128 rows, batches of 64, 300 ms per batch: of four 64-row requests sent at
    once, one runs, two wait in the queue and the fourth is refused at once."""
    before = scrape(second_version.url)
    rows = split.x_test[:64]
    body = {"inputs": [{"name": "input", "shape": [64, 64], "datatype": "FP32", "data": rows.tolist()}]}
    barrier = threading.Barrier(4)

    def send(_: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(f"{second_version.url}/v2/models/digits/infer", json=body, timeout=30)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    rejected = [a for a in answers if a.status_code == 503]
    assert len(rejected) == 1 and sum(a.status_code == 200 for a in answers) == 3
    assert rejected[0].headers["retry-after"] == "1"
    assert "overloaded" in rejected[0].json()["error"]
    after = scrape(second_version.url)
    assert total(after, "canary_overload_rejections_total") - total(before, "canary_overload_rejections_total") == 1


def test_metrics_show_model_info_predictions_and_latency(serving, built_pipeline, split):
    body = {"inputs": [{"name": "input", "shape": [10, 64], "datatype": "FP32", "data": split.x_test[:10].tolist()}]}
    httpx.post(f"{serving.url}/v2/models/digits/infer", json=body, timeout=30).raise_for_status()
    samples = scrape(serving.url)
    version = str(built_pipeline.version)
    assert total(samples, "canary_model_info", version=version, sha256=built_pipeline.sha256, slot="test") == 1
    assert total(samples, "canary_predictions_total", version=version) >= 10
    assert total(samples, "canary_prediction_confidence_count", version=version) >= 10
    assert total(samples, "canary_requests_total", protocol="rest", status="200", version=version) >= 1
    assert total(samples, "canary_request_duration_seconds_count", protocol="rest") >= 1
    assert total(samples, "canary_inference_duration_seconds_count") >= 1
    assert ("canary_queue_rows", frozenset({("model", "digits"), ("version", version), ("slot", "test")})) in samples


def test_server_logs_are_json_lines_with_slot_and_model_version(serving, built_pipeline, canary_home):
    import json

    httpx.post(f"{serving.url}/v2/models/digits/infer", content=b"{broken", timeout=30)

    def read_entries() -> list[dict]:
        lines = (canary_home.logs / "test-serve.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    # the access line is written after the answer went out: under load it can trail the client
    deadline = time.monotonic() + 15
    while not any("/v2/models/digits/infer" in e["message"] for e in read_entries()) and time.monotonic() < deadline:
        time.sleep(0.1)
    entries = read_entries()
    assert entries, "no JSON log lines"
    assert {e["slot"] for e in entries} == {"test"}
    assert {e["model_version"] for e in entries} == {str(built_pipeline.version)}
    assert any("/v2/models/digits/infer" in e["message"] for e in entries)  # access log lines too


def test_request_parameter_cache_false_skips_the_cache(serving, split):
    rows = split.x_test[300:302] * 0.25 + 0.5  # inputs no other test sends
    body = {
        "parameters": {"cache": False},
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": rows.tolist()}],
    }
    before = scrape(serving.url)
    for _ in range(3):
        httpx.post(f"{serving.url}/v2/models/digits/infer", json=body, timeout=30).raise_for_status()
    after = scrape(serving.url)
    for kind in ("hit", "miss"):
        assert total(after, "canary_cache_events_total", kind=kind) == total(
            before, "canary_cache_events_total", kind=kind
        )

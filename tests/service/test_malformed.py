"""Bad input against a real `bentoml serve`: a clear 4xx / gRPC status for every client
mistake across the three protocols, never a 500 or a crash, and a healthy server after."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb2
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from tests.support.pipeline import REST_LISTENERS

pytestmark = pytest.mark.slow

ROW = [1.0] * 64


def v2(data=None, shape=(1, 64), datatype="FP32", name="input", **extra) -> bytes:
    tensor = {"name": name, "shape": list(shape), "datatype": datatype, "data": ROW if data is None else data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary(header: dict, tail: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head) if declared is None else declared)}


_HEAD = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}
REST_CASES = [
    ("malformed-json", "/v2/models/digits/infer", b"{inputs: nope", {}, 400),
    ("body-not-object", "/v2/models/digits/infer", b"[1, 2]", {}, 400),
    ("inputs-missing", "/v2/models/digits/infer", b"{}", {}, 400),
    ("inputs-empty", "/v2/models/digits/infer", b'{"inputs": []}', {}, 400),
    ("wrong-input-name", "/v2/models/digits/infer", v2(name="pixels"), {}, 400),
    ("wrong-shape", "/v2/models/digits/infer", v2(data=[1.0] * 63, shape=(1, 63)), {}, 400),
    ("wrong-dtype", "/v2/models/digits/infer", v2(data=[1] * 64, datatype="INT64"), {}, 400),
    ("unknown-dtype", "/v2/models/digits/infer", v2(datatype="FP128"), {}, 400),
    ("nan", "/v2/models/digits/infer", v2(data=[float("nan")] + ROW[1:]), {}, 400),
    ("inf", "/v2/models/digits/infer", v2(data=[float("inf")] + ROW[1:]), {}, 400),
    ("out-of-range", "/v2/models/digits/infer", v2(data=[17.0] + ROW[1:]), {}, 400),
    ("not-numbers", "/v2/models/digits/infer", v2(data=["a"] * 64), {}, 400),
    ("values-vs-shape", "/v2/models/digits/infer", v2(data=ROW * 2), {}, 400),
    ("negative-shape", "/v2/models/digits/infer", v2(shape=(-1, 64)), {}, 400),
    ("empty-batch", "/v2/models/digits/infer", v2(data=[], shape=(0, 64)), {}, 400),
    ("too-many-rows", "/v2/models/digits/infer", v2(data=ROW * 1025, shape=(1025, 64)), {}, 413),
    ("body-too-large", "/v2/models/digits/infer", b" " * (9 << 20), {}, 413),
    ("unknown-output", "/v2/models/digits/infer", v2(outputs=[{"name": "nope"}]), {}, 400),
    ("unknown-model", "/v2/models/nope/infer", v2(), {}, 404),
    ("unknown-version", "/v2/models/digits/versions/999/infer", v2(), {}, 404),
    ("binary-header-past-body", "/v2/models/digits/infer", *binary(_HEAD, b"\0" * 256, declared=10_000), 400),
    ("binary-size-missing", "/v2/models/digits/infer",
     *binary({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}, b"\0" * 256), 400),
    ("binary-too-short", "/v2/models/digits/infer", *binary(_HEAD, b"\0" * 100), 400),
    ("binary-extra-bytes", "/v2/models/digits/infer", *binary(_HEAD, b"\0" * 300), 400),
    ("compressed", "/v2/models/digits/infer", v2(), {"Content-Encoding": "gzip"}, 400),
]  # fmt: skip


@pytest.mark.parametrize("listener", REST_LISTENERS)
@pytest.mark.parametrize(("case", "path", "body", "headers", "status"), REST_CASES, ids=[c[0] for c in REST_CASES])
def test_rest_mistakes_get_their_status_and_a_json_error(serving, listener, case, path, body, headers, status):
    answer = httpx.post(
        f"{serving.rest(listener)}{path}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert isinstance(error, str) and error and "Traceback" not in error


def _grpc_request(**overrides) -> pb2.ModelInferRequest:
    rows = overrides.pop("rows", 1)
    request = pb2.ModelInferRequest(
        model_name=overrides.pop("model", "digits"), model_version=overrides.pop("version", "")
    )
    request.inputs.add(name="input", datatype=overrides.pop("datatype", "FP32"), shape=[rows, 64])
    request.raw_input_contents.append(overrides.pop("raw", np.ones((rows, 64), np.float32).tobytes()))
    return request


GRPC_CASES = [
    ("wrong-dtype", _grpc_request(datatype="FP64", raw=np.ones((1, 64)).tobytes()), grpc.StatusCode.INVALID_ARGUMENT),
    ("raw-length", _grpc_request(raw=b"\0" * 10), grpc.StatusCode.INVALID_ARGUMENT),
    ("nan", _grpc_request(raw=np.full((1, 64), np.nan, np.float32).tobytes()), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown-model", _grpc_request(model="nope"), grpc.StatusCode.NOT_FOUND),
    ("unknown-version", _grpc_request(version="999"), grpc.StatusCode.NOT_FOUND),
    ("too-many-rows", _grpc_request(rows=1025), grpc.StatusCode.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize(("case", "request_pb", "code"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_mistakes_get_their_status(serving, case, request_pb, code):
    with grpc.insecure_channel(serving.grpc) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request_pb, timeout=30)
    assert info.value.code() == code
    assert info.value.details()


NATIVE_CASES = [
    ("short-rows", {"pixels": [[1.0] * 63]}),
    ("strings", {"pixels": [["a"] * 64]}),
    ("out-of-range", {"pixels": [[99.0] * 64]}),
    ("ragged", {"pixels": [[1.0] * 64, [1.0]]}),
    ("missing-field", {"images": [[1.0] * 64]}),
]


@pytest.mark.parametrize(("case", "body"), NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_api_mistakes_are_400(serving, case, body):
    answer = httpx.post(f"{serving.url}/classify", json=body, timeout=30)
    assert 400 <= answer.status_code < 500, answer.text


def test_server_is_healthy_after_the_mistakes(serving):
    # Runs last in this module (pytest keeps file order): the same server took every case above.
    for base in (serving.url, serving.v2):
        assert httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 200
        answer = httpx.post(f"{base}/v2/models/digits/infer", content=v2(), timeout=30)
        assert answer.status_code == 200 and len(answer.json()["outputs"][0]["data"]) == 10
    with grpc.insecure_channel(serving.grpc) as channel:
        reply = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_grpc_request(), timeout=30)
    assert len(reply.raw_output_contents[0]) == 40
    assert httpx.post(f"{serving.url}/classify", json={"pixels": [ROW]}, timeout=30).status_code == 200

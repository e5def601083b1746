"""bench's gRPC ceiling contender, served for real: a `grpc.aio` process answering every
ModelInfer with the model's answer to an all-zero digit, whatever it is sent, ready on HTTP."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from bench.contenders import GrpcCeiling, ServeContext, SkipContender
from bench.h2grpc import ok_answer_bytes
from tests.support.tiny_model import write_tiny_onnx


def test_the_ceiling_answers_a_real_grpc_call_with_a_real_sized_answer(tmp_path):
    onnx_path = tmp_path / "tiny.onnx"
    write_tiny_onnx(onnx_path)
    expected = ort.InferenceSession(str(onnx_path)).run(None, {"input": np.zeros((1, 64), np.float32)})[0]
    rows = np.full((1, 64), 7.0, np.float32)
    ctx = ServeContext(workers=1, logs=tmp_path / "logs", rows=rows, bentoml_home=tmp_path / "bentoml")
    model = SimpleNamespace(onnx_path=onnx_path, architecture="digits-cnn")
    with GrpcCeiling().serve(model, ctx) as served:  # type: ignore[arg-type]
        (endpoint,) = served.endpoints
        assert endpoint.protocol == "grpc"
        client = grpcclient.InferenceServerClient(endpoint.target)
        given = grpcclient.InferInput("input", [1, 64], "FP32")
        given.set_data_from_numpy(rows)
        answer = client.infer("digits", [given]).as_numpy("logits")
        np.testing.assert_array_equal(answer, expected)  # the fixed answer, not a model call on the input
        # what h2load's size check will count as OK: the bench request's framed answer
        assert ok_answer_bytes(endpoint.target, endpoint.payload.body) == 5 + len(
            client.infer("digits", [given]).get_response().SerializeToString()
        )
        client.close()


def test_the_ceiling_is_measured_once_with_the_fast_model(tmp_path):
    ctx = ServeContext(workers=1, logs=tmp_path, rows=np.zeros((1, 64), np.float32), bentoml_home=tmp_path)
    with pytest.raises(SkipContender, match="measured once, with digits-cnn"):
        with GrpcCeiling().serve(SimpleNamespace(onnx_path=tmp_path / "x.onnx", architecture="digits-heavy"), ctx):  # type: ignore[arg-type]
            pass

"""`canary export --quantize int8`: an int8 graph in the store only when it keeps its accuracy,
served by the same Bento like any other version."""

from __future__ import annotations

import bentoml
import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bentoml.exceptions import NotFound

from models.data import load_split
from models.errors import QuantizationRefused
from models.pipeline import export_version, train_and_register
from models.registry import Registry
from models.train import TrainConfig
from tests.support.canary_cli import assert_one_line_error, run_canary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_export(canary_home):
    trained = train_and_register(canary_home, TrainConfig(model="digits-cnn", epochs=3, seed=1))
    return trained, export_version(canary_home, version=trained.ref.version, quantize="int8")


def test_int8_export_stores_a_quantised_graph_with_its_accuracy_lineage(int8_export, canary_home):
    trained, result = int8_export
    stored = bentoml.models.get(result.stored.tag)
    labels = stored.info.labels
    assert labels["precision"] == "int8"
    drop = float(labels["int8_accuracy_drop_pp"])
    assert drop <= 0.5
    assert abs(float(labels["onnx_test_accuracy"]) - result.onnx_test_accuracy) < 1e-6
    assert float(labels["fp32_test_accuracy"]) - float(labels["int8_test_accuracy"]) == pytest.approx(
        drop / 100, abs=1e-5
    )
    graph = onnx.load(stored.path_of("model.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    tags = Registry(canary_home).get(trained.ref.version).tags
    assert tags["precision"] == "int8" and tags["onnx_sha256"] == labels["sha256"]


def test_the_served_int8_model_answers_like_the_int8_graph_in_process(int8_export, canary_home):
    from deploy.process import free_port, served_bento
    from models.bento import build_bento

    trained, result = int8_export
    built = build_bento(canary_home, version=trained.ref.version)
    split = load_split()
    session = ort.InferenceSession(bentoml.models.get(result.stored.tag).path_of("model.onnx"))
    expected = session.run(["logits"], {"input": split.x_test[:32]})[0]
    rest_port = free_port()
    env = {"CANARY_SERVICE_REST_PORT": str(rest_port), "CANARY_SERVICE_GRPC_PORT": "0"}
    with served_bento(built.tag, free_port(), canary_home.logs / "test-serve-int8.log", env):
        body = {
            "inputs": [{"name": "input", "shape": [32, 64], "datatype": "FP32", "data": split.x_test[:32].tolist()}]
        }
        answer = httpx.post(f"http://127.0.0.1:{rest_port}/v2/models/digits/infer", json=body, timeout=30)
        meta = httpx.get(f"http://127.0.0.1:{rest_port}/v2/models/digits", timeout=10).json()
    assert answer.status_code == 200, answer.text
    got = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(32, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert meta["parameters"]["precision"] == "int8"


def test_an_int8_graph_that_loses_accuracy_is_refused_and_nothing_is_written(canary_home):
    trained = train_and_register(canary_home, TrainConfig(model="digits-cnn", epochs=1, seed=2))
    version = trained.ref.version
    # A limit no graph can meet (it would have to gain 100 points): the refusal path.
    with pytest.raises(QuantizationRefused, match="refused, nothing was written"):
        export_version(canary_home, version=version, quantize="int8", max_drop_pp=-100)
    with pytest.raises(NotFound):
        bentoml.models.get(f"digits:v{version}")
    registry = Registry(canary_home)
    assert "onnx_sha256" not in registry.get(version).tags
    assert registry.client.list_artifacts(registry.get(version).run_id, "onnx") == []


def test_an_unknown_precision_is_one_line(canary_home, built_pipeline):
    result = run_canary("export", "--version", str(built_pipeline.version), "--quantize", "int4")
    assert_one_line_error(result, "--quantize must be one of fp32, int8")

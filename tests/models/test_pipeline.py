"""The pipeline end to end: train -> register -> export -> build -> serve -> predict."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from models.data import load_split
from models.registry import Registry

pytestmark = pytest.mark.slow


def v2_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}


def test_served_predictions_equal_in_process_onnx_runtime_on_the_test_split(served, built_pipeline, canary_home):
    import bentoml

    split = load_split()
    answer = httpx.post(f"{served}/v2/models/digits/infer", json=v2_body(split.x_test), timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_name"] == "digits"
    assert body["model_version"] == str(built_pipeline.version)
    assert answer.headers["x-model-version"] == str(built_pipeline.version)
    served_logits = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(len(split.x_test), 10)

    stored = bentoml.models.get(f"digits:v{built_pipeline.version}")
    session = ort.InferenceSession(stored.path_of("model.onnx"), providers=["CPUExecutionProvider"])
    local_logits = session.run(["logits"], {"input": split.x_test})[0]
    np.testing.assert_allclose(served_logits, local_logits, rtol=1e-5, atol=1e-5)
    accuracy = float((served_logits.argmax(1) == split.y_test).mean())
    assert accuracy > 0.8  # a real, trained model: 3 epochs reach ~87-92%


def test_the_training_inputs_distribution_is_stored_with_the_model(built_pipeline):
    """The input-drift reference (service/core/drift.py): the training digits' per-pixel bins."""
    import bentoml

    from service.core.drift import DriftReference

    reference = DriftReference.load(Path(bentoml.models.get(f"digits:v{built_pipeline.version}").path))
    assert reference is not None and reference.features == 64 and reference.rows == len(load_split().x_train)
    assert (reference.counts.sum(axis=1) == reference.rows).all() and (reference.low, reference.high) == (0.0, 16.0)


def test_lineage_sha256_is_the_same_in_mlflow_the_store_and_the_server(served, built_pipeline, canary_home):
    import bentoml

    mlflow_tags = Registry(canary_home).get(built_pipeline.version).tags
    store_labels = bentoml.models.get(f"digits:v{built_pipeline.version}").info.labels
    meta = httpx.get(f"{served}/v2/models/digits", timeout=10).json()

    assert mlflow_tags["onnx_sha256"] == built_pipeline.sha256
    assert store_labels["sha256"] == built_pipeline.sha256
    assert meta["parameters"]["sha256"] == built_pipeline.sha256
    assert store_labels["run_id"] == built_pipeline.run_id == meta["parameters"]["run_id"]
    assert store_labels["model_version"] == str(built_pipeline.version)
    assert float(mlflow_tags["parity_max_abs_diff"]) <= 1e-4
    assert store_labels["inputs"] == "input:float[-1,64]"


def test_mlflow_run_has_params_per_epoch_metrics_and_a_signature(built_pipeline, canary_home):
    import mlflow

    registry = Registry(canary_home)
    run = registry.client.get_run(built_pipeline.run_id)
    assert run.data.params["epochs"] == "3" and run.data.params["seed"] == "0"
    history = registry.client.get_metric_history(built_pipeline.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    info = mlflow.models.get_model_info(f"models:/digits/{built_pipeline.version}")
    assert info.signature is not None and info.saved_input_example_info is not None
    artifacts = [a.path for a in registry.client.list_artifacts(built_pipeline.run_id, "onnx")]
    assert artifacts == [f"onnx/v{built_pipeline.version}"]


def test_first_version_is_champion(built_pipeline, canary_home):
    # as registered: release tests later in the session promote other versions to champion
    registry = Registry(canary_home)
    first = min(int(v.version) for v in registry.client.search_model_versions("name='digits'"))
    assert built_pipeline.version == first and "champion" in built_pipeline.aliases


def test_bento_carries_onnxruntime_but_not_torch_or_mlflow(built_pipeline, canary_home):
    names = {r.split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in built_pipeline.requirements}
    assert "onnxruntime" in names
    assert not names & {"torch", "mlflow", "mlflow-skinny", "scikit-learn"}
    archive = canary_home.bentos_dir / f"digits-service-v{built_pipeline.version}.bento"
    assert archive.stat().st_size == built_pipeline.archive_bytes
    assert built_pipeline.archive_bytes < 5_000_000  # source + one small ONNX graph


def test_native_bentoml_api_classifies_with_the_bentoml_client(served, built_pipeline):
    import bentoml

    split = load_split()
    with bentoml.SyncHTTPClient(served) as client:
        result = client.classify(pixels=split.x_test[:16].tolist())
    assert result["model_version"] == str(built_pipeline.version)
    assert len(result["classes"]) == 16
    assert sum(c == t for c, t in zip(result["classes"], split.y_test[:16], strict=True)) >= 12
    assert all(0.0 < p <= 1.0 for p in result["confidences"])


def test_readiness_and_liveness_answer(served):
    assert httpx.get(f"{served}/v2/health/live", timeout=5).status_code == 200
    assert httpx.get(f"{served}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{served}/readyz", timeout=5).status_code == 200
    assert httpx.get(f"{served}/v2/models/digits/ready", timeout=5).json() == {"name": "digits", "ready": True}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/digits/infer", b"{not json", 400),
        ("/v2/models/digits/infer", b'{"inputs": []}', 400),
        ("/v2/models/nope/infer", None, 404),
        ("/v2/models/digits/versions/999/infer", None, 404),
    ],
)
def test_bad_requests_get_a_clear_json_error(served, path, body, status):
    content = (
        body if body is not None else httpx.Request("POST", "/", json=v2_body(np.zeros((1, 64), np.float32))).content
    )
    answer = httpx.post(f"{served}{path}", content=content, headers={"content-type": "application/json"}, timeout=10)
    assert answer.status_code == status
    assert isinstance(answer.json()["error"], str) and answer.json()["error"]


def test_each_bento_packs_its_own_model_when_built_in_one_process(built_pipeline, second_version, canary_home):
    """Two builds in one process (the benchmark and the tests do this): the second Bento
    must carry its own model, not the model the first build's import of the service saw."""
    import bentoml

    from models.bento import build_bento

    built = build_bento(canary_home, version=second_version.version)
    for tag, version in ((built.tag, second_version.version), (built_pipeline.bento_tag, built_pipeline.version)):
        info = bentoml.bentos.get(tag).info
        packed = {str(model.tag) for service in info.services for model in service.models}
        assert packed == {f"digits:v{version}"}, tag

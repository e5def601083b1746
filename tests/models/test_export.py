"""Export refuses graphs that do not reproduce their source model, and is not torch-only."""

from __future__ import annotations

import bentoml
import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from bentoml.exceptions import NotFound

from models.data import load_split
from models.errors import ParityError
from models.nets import TORCH_ARCHITECTURES
from models.pipeline import export_version, train_and_register
from models.registry import Registry
from models.train import TrainConfig, TrainedModel
from tests.support.faulty_model import ExportSkewedCNN

pytestmark = pytest.mark.slow


def _register(canary_home, model, architecture: str) -> int:
    """Register `model` as a version of the architecture `architecture` (export rebuilds it
    from that name, never from a pickle)."""
    registry = Registry(canary_home)
    split = load_split()
    trained = TrainedModel(TrainConfig(model="digits-cnn", epochs=1), "pytorch", model.eval())
    with registry.start_run("export-skewed"):
        ref = registry.log_trained(trained, split.x_test[:5])
    registry.client.set_model_version_tag(registry.name, str(ref.version), "architecture", architecture)
    return ref.version


def test_parity_failure_is_refused_and_leaves_nothing_behind(canary_home, monkeypatch):
    monkeypatch.setitem(TORCH_ARCHITECTURES, "digits-export-skewed", ExportSkewedCNN)
    version = _register(canary_home, ExportSkewedCNN(), "digits-export-skewed")
    with pytest.raises(ParityError, match="parity check failed"):
        export_version(canary_home, version=version)
    with pytest.raises(NotFound):
        bentoml.models.get(f"digits:v{version}")
    registry = Registry(canary_home)
    assert "onnx_sha256" not in registry.get(version).tags
    assert registry.client.list_artifacts(registry.get(version).run_id, "onnx") == []


def test_sklearn_model_exports_with_parity(canary_home):
    trained = train_and_register(canary_home, TrainConfig(model="digits-linear", epochs=5, seed=0))
    result = export_version(canary_home, version=trained.ref.version)
    assert result.max_abs_diff <= 1e-4
    stored = bentoml.models.get(result.stored.tag)
    assert stored.info.labels["scores_output"] == "probabilities"
    assert stored.info.labels["architecture"] == "digits-linear"
    split = load_split()
    session = ort.InferenceSession(stored.path_of("model.onnx"), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"input": split.x_test})[0]
    source = mlflow.sklearn.load_model(trained.ref.uri)
    np.testing.assert_array_equal(probabilities.argmax(1), source.predict(split.x_test))
    assert abs(result.onnx_test_accuracy - trained.test_accuracy) < 1e-9


def test_exporting_twice_is_idempotent(canary_home, built_pipeline):
    again = export_version(canary_home, version=built_pipeline.version)
    assert again.sha256 == built_pipeline.sha256  # deterministic ONNX bytes for the same weights

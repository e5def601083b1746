"""Loading a model from the registry runs no code: export reads only the safe copy of each
version (PyTorch state dict with `weights_only=True`, scikit-learn through skops), checks its
sha256 against the version's tag, and refuses ONNX graphs with external data.

A planted pickle proves it: its `__reduce__` would create a marker file when unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from models.errors import CanaryError, IntegrityError
from models.export import refuse_external_data
from models.nets import DigitsCNN
from models.pipeline import export_version, train_and_register
from models.registry import SAFE_SHA256_TAG, SAFE_TAG, Registry
from models.train import TrainConfig, TrainedModel
from service.core.runner import file_sha256

pytestmark = pytest.mark.slow


class Planted:
    """Unpickling this runs `Path(marker).touch()`: what a hostile registry entry would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def register_cnn(home) -> int:
    from models.data import load_split

    registry = Registry(home)
    with registry.start_run("safety"):
        ref = registry.log_trained(TrainedModel(TrainConfig(model="digits-cnn"), "pytorch", DigitsCNN().eval()),
                                   load_split().x_test[:5])  # fmt: skip
    return ref.version


def safe_file(home, version: int) -> Path:
    """Where the embedded artifact store keeps a version's safe copy."""
    registry = Registry(home)
    ref = registry.get(version)
    root = registry.client.get_run(ref.run_id).info.artifact_uri.removeprefix("file://")
    return Path(root) / ref.tags[SAFE_TAG]


def plant(home, version: int, marker: Path) -> None:
    """Replace the safe copy with a hostile pickle, and make the registry's digest match it."""
    path = safe_file(home, version)
    path.write_bytes(pickle.dumps(Planted(marker)))
    registry = Registry(home)
    registry.client.set_model_version_tag(registry.name, str(version), SAFE_SHA256_TAG, file_sha256(path))


def test_export_never_unpickles_mlflows_copy(canary_home, monkeypatch):
    import mlflow

    trained = train_and_register(canary_home, TrainConfig(model="digits-linear", epochs=3, seed=3))

    def refuse(*_args, **_kwargs):
        raise AssertionError("export unpickled the MLflow model")

    monkeypatch.setattr(mlflow.sklearn, "load_model", refuse)
    monkeypatch.setattr(mlflow.pytorch, "load_model", refuse)
    result = export_version(canary_home, version=trained.ref.version)
    assert result.max_abs_diff <= 1e-4


def test_planted_pytorch_weights_are_refused_without_running(canary_home, tmp_path):
    version = register_cnn(canary_home)
    marker = tmp_path / "ran"
    plant(canary_home, version, marker)
    with pytest.raises(IntegrityError, match="refused to load the weights into digits-cnn"):
        export_version(canary_home, version=version)
    assert not marker.exists(), "the planted pickle ran"


def test_planted_sklearn_model_is_refused_without_running(canary_home, tmp_path):
    trained = train_and_register(canary_home, TrainConfig(model="digits-linear", epochs=2, seed=4))
    marker = tmp_path / "ran"
    plant(canary_home, trained.ref.version, marker)
    with pytest.raises(IntegrityError, match="refused to load the scikit-learn model"):
        export_version(canary_home, version=trained.ref.version)
    assert not marker.exists(), "the planted pickle ran"


def test_a_safe_copy_changed_behind_the_registrys_back_is_refused(canary_home):
    version = register_cnn(canary_home)
    path = safe_file(canary_home, version)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=r"has sha256 .*, the registry says"):
        export_version(canary_home, version=version)


def test_a_version_without_a_safe_copy_is_refused_in_one_line(canary_home):
    version = register_cnn(canary_home)
    registry = Registry(canary_home)
    registry.client.delete_model_version_tag(registry.name, str(version), SAFE_TAG)
    with pytest.raises(CanaryError, match="has no weights that load without running code") as error:
        export_version(canary_home, version=version)
    assert "\n" not in str(error.value)


def test_onnx_graphs_with_external_data_are_refused(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 10), dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph)
    inline = tmp_path / "inline.onnx"
    onnx.save(model, str(inline))
    refuse_external_data(inline)  # all weights inside: accepted
    external = tmp_path / "external.onnx"
    onnx.save(model, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    with pytest.raises(IntegrityError, match="keeps 1 tensors in external files"):
        refuse_external_data(external)

"""Training is deterministic for a seed, and the three model kinds all learn the task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import load_split
from models.train import TrainConfig, train


@pytest.fixture(scope="module")
def split():
    return load_split()


def _weights(trained) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in trained.model.parameters()]


def test_same_seed_gives_identical_weights_and_history(split):
    first = train(TrainConfig(model="digits-cnn", epochs=2, seed=7), split)
    second = train(TrainConfig(model="digits-cnn", epochs=2, seed=7), split)
    for a, b in zip(_weights(first), _weights(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.history == second.history


def test_another_seed_gives_another_model(split):
    first = train(TrainConfig(model="digits-cnn", epochs=1, seed=1), split)
    second = train(TrainConfig(model="digits-cnn", epochs=1, seed=2), split)
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(first), _weights(second), strict=True))


def test_sklearn_model_is_deterministic_and_learns(split):
    first = train(TrainConfig(model="digits-linear", epochs=5, seed=3), split)
    second = train(TrainConfig(model="digits-linear", epochs=5, seed=3), split)
    np.testing.assert_array_equal(first.model[-1].coef_, second.model[-1].coef_)
    assert first.test_accuracy > 0.85


def test_split_is_fixed_and_disjoint(split):
    again = load_split()
    np.testing.assert_array_equal(split.x_test, again.x_test)
    assert len(split.x_train) + len(split.x_val) + len(split.x_test) == 1797
    assert split.x_test.max() == 16.0  # raw pixels, no scaling outside the model


def test_scaling_lives_inside_the_model():
    from models.nets import DigitsCNN

    model = DigitsCNN().eval()
    raw = torch.full((1, 64), 16.0)
    with torch.no_grad():
        assert not torch.equal(model(raw), model(raw / 16.0))


def test_the_heavy_networks_normalisation_folds_into_its_convolutions(tmp_path):
    """digits-heavy trains with batch normalisation; the exported graph must not pay for it
    (Conv + Relu only) and must still compute what the network does."""
    import onnx
    import onnxruntime as ort

    from models.export import export_onnx
    from models.nets import DigitsHeavy

    torch.manual_seed(0)
    model = DigitsHeavy(width=16, depth=2)
    for layer in model.features:  # running statistics far from the identity, so folding shows
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.data.uniform_(0.5, 2)
            layer.bias.data.uniform_(-1, 1)
    model.eval()
    path = tmp_path / "heavy.onnx"
    contract = export_onnx("pytorch", model, path)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    x = np.random.default_rng(0).uniform(0, 16, (8, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {contract.input_name: x})[0], expected, atol=1e-4)


@pytest.mark.parametrize(
    "bad",
    [
        TrainConfig(epochs=0),
        TrainConfig(model="resnet-9000"),
        TrainConfig(batch_size=0),
        TrainConfig(lr_schedule="step"),
    ],
)
def test_bad_training_config_is_refused(bad, split):
    from models.errors import CanaryError

    with pytest.raises(CanaryError):
        train(bad, split)

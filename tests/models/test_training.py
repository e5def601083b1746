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


@pytest.mark.parametrize("bad", [TrainConfig(epochs=0), TrainConfig(model="resnet-9000"), TrainConfig(batch_size=0)])
def test_bad_training_config_is_refused(bad, split):
    from models.errors import CanaryError

    with pytest.raises(CanaryError):
        train(bad, split)

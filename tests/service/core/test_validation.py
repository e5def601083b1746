"""The core's input checks on non-finite values: NaN and +/-Inf are refused by name, with and
without a declared input range (the range path reads finiteness off the extremes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from service.core.errors import InvalidInput
from service.core.tensors import InferRequest, InferTensor
from tests.support.tiny_model import tiny_core


def _request(rows: np.ndarray) -> InferRequest:
    return InferRequest("digits", None, [InferTensor("input", "FP32", rows.shape, rows.reshape(-1))])


@pytest.mark.parametrize("ranged", [True, False], ids=["with-range", "without-range"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_refused_as_such(tmp_path, ranged, bad):
    core = tiny_core(tmp_path)
    if not ranged:
        core.card = dataclasses.replace(core.card, input_range=None)
    rows = np.ones((3, 64), np.float32)
    rows[2, 7] = bad
    with pytest.raises(InvalidInput, match="contains NaN or Inf"):
        core.validate(_request(rows))


def test_finite_values_outside_the_range_are_refused_with_the_range(tmp_path):
    core = tiny_core(tmp_path)
    rows = np.ones((2, 64), np.float32)
    rows[1, 0] = 16.5
    with pytest.raises(InvalidInput, match=r"must lie in \[0, 16\]"):
        core.validate(_request(rows))
    rows[1, 0] = 16.0  # the edges are inside
    assert core.validate(_request(rows)).rows == 2

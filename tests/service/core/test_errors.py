"""One error hierarchy, one mapping: each row maps to its HTTP status and gRPC code."""

from __future__ import annotations

import json

import grpc
import pytest

from service.core.errors import (
    InferenceError,
    InvalidInput,
    LabelConflict,
    ModelNotFound,
    PayloadTooLarge,
    Unavailable,
    UnknownPrediction,
)
from service.core.faults import InjectedFault
from service.v2.rest import _error

ROWS = [
    (InvalidInput, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (PayloadTooLarge, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelNotFound, 404, grpc.StatusCode.NOT_FOUND),
    (UnknownPrediction, 404, grpc.StatusCode.NOT_FOUND),
    (LabelConflict, 409, grpc.StatusCode.ALREADY_EXISTS),
    (Unavailable, 503, grpc.StatusCode.UNAVAILABLE),
    (InjectedFault, 500, grpc.StatusCode.INTERNAL),
    (InferenceError, 500, grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("error", "status", "code"), ROWS, ids=[r[0].__name__ for r in ROWS])
def test_each_error_maps_to_its_http_status_and_grpc_code(error, status, code):
    response = _error(error("what went wrong"))
    assert response.status_code == status
    assert json.loads(response.body) == {"error": "what went wrong"}
    assert grpc.StatusCode[error.grpc_code] == code


def test_unavailable_tells_clients_when_to_retry():
    assert _error(Unavailable("busy")).headers["retry-after"] == "1"


def test_unexpected_errors_hide_their_internals():
    response = _error(KeyError("secret internal detail"))
    assert response.status_code == 500
    assert json.loads(response.body) == {"error": "internal error"}

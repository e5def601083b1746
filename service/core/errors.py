"""One error hierarchy for the data plane, mapped once to HTTP status and gRPC code.

Adapters catch `InferenceError` at their boundary and use `http_status` / `grpc_code`;
anything else becomes a 500 / INTERNAL whose body never carries internals.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error a client may see. The message is safe to return."""

    http_status = 500
    grpc_code = "INTERNAL"


class InvalidInput(InferenceError):
    """The request is malformed or does not match the model's inputs."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(InferenceError):
    """The request exceeds a size limit (body bytes or rows per request)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class ModelNotFound(InferenceError):
    """An unknown model name or version."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class UnknownPrediction(InferenceError):
    """Feedback names a request id the prediction log does not hold (never logged, or expired)."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class LabelConflict(InferenceError):
    """Feedback gives a different label for a prediction that already has one."""

    http_status = 409
    grpc_code = "ALREADY_EXISTS"


class Unavailable(InferenceError):
    """Not ready yet, or overloaded: retry, possibly elsewhere."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


INTERNAL_MESSAGE = "internal error"

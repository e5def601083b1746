"""The pipeline's one error type: a failure the user can act on.

Every `CanaryError` becomes one line on stderr and exit code 1 in the CLI; anything else
is a bug and keeps its traceback.
"""


class CanaryError(Exception):
    """A user-facing failure with a one-line message."""


class NotFoundError(CanaryError):
    """A model version, alias, Bento or state folder that does not exist."""


class ParityError(CanaryError):
    """The exported ONNX graph does not reproduce the source model."""


class IntegrityError(CanaryError):
    """An artifact whose bytes are not what its lineage says (corrupt or tampered)."""


class QuantizationRefused(CanaryError):
    """A quantised graph lost more test accuracy than allowed; nothing was written."""


class ConflictError(CanaryError):
    """An object changed between read and write (a Kubernetes 409); `what` says which."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}; run the command again")
        self.what = what

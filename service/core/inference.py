"""`InferenceCore`: the transport-free heart of the service.

It validates a request against the `ModelCard`, runs it, and answers in the same
transport-free types; the BentoML, V2 REST and V2 gRPC adapters only translate.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from service.core.errors import InvalidInput, ModelNotFound, PayloadTooLarge, Unavailable
from service.core.model import ModelCard
from service.core.runner import OnnxRunner
from service.core.tensors import InferRequest, InferResponse, InferTensor, v2_datatype


@dataclass(frozen=True)
class Classification:
    classes: list[int]
    confidences: list[float]


class InferenceCore:
    def __init__(self, runner: OnnxRunner, max_rows_per_request: int = 1024) -> None:
        self.runner = runner
        self.card: ModelCard = runner.card
        self.max_rows = max_rows_per_request
        self.ready = False

    def start(self) -> None:
        """Warm up, then turn ready: readiness means the first request will be fast."""
        self.runner.warm_up()
        self.ready = True

    # -- identity ------------------------------------------------------------------------
    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.card.name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.card.name!r}")
        if version not in (None, "", self.card.version):
            raise ModelNotFound(
                f"unknown version {version!r} of model {name!r}; this server serves version {self.card.version}"
            )

    # -- inference -----------------------------------------------------------------------
    def validate(self, request: InferRequest) -> tuple[dict[str, np.ndarray], list[str]]:
        """Check a request against the card; return the feed and the output names to run."""
        self.check_model(request.model_name, request.model_version)
        if not self.ready:
            raise Unavailable("model is not ready yet")
        declared = {spec.name: spec for spec in self.card.inputs}
        given = [t.name for t in request.inputs]
        if sorted(given) != sorted(declared) or len(set(given)) != len(given):
            raise InvalidInput(f"inputs must be exactly {sorted(declared)}, got {given}")
        feed: dict[str, np.ndarray] = {}
        for tensor in request.inputs:
            feed[tensor.name] = self._check_tensor(tensor, declared[tensor.name])
        outputs = request.outputs or [o.name for o in self.card.outputs]
        unknown = [name for name in outputs if self.card.output_spec(name) is None]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; the model has {[o.name for o in self.card.outputs]}")
        return feed, list(dict.fromkeys(outputs))

    def _check_tensor(self, tensor: InferTensor, spec) -> np.ndarray:
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {tensor.name!r} must be {spec.datatype}, got {tensor.datatype}")
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(d != s for d, s in zip(shape, spec.shape, strict=True) if s != -1):
            raise InvalidInput(f"input {tensor.name!r} must have shape {list(spec.shape)}, got {list(shape)}")
        rows = shape[0] if shape else 0
        if rows < 1:
            raise InvalidInput(f"input {tensor.name!r} is an empty batch")
        if rows > self.max_rows:
            raise PayloadTooLarge(f"input {tensor.name!r} has {rows} rows; the limit is {self.max_rows}")
        data = tensor.data
        if data.size != int(np.prod(shape)):
            raise InvalidInput(f"input {tensor.name!r} has {data.size} values, shape {list(shape)} needs {int(np.prod(shape))}")
        data = data.reshape(shape)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InvalidInput(f"input {tensor.name!r} contains NaN or Inf")
        if self.card.input_range is not None:
            low, high = self.card.input_range
            if data.min() < low or data.max() > high:
                raise InvalidInput(f"input {tensor.name!r} values must lie in [{low:g}, {high:g}]")
        return np.ascontiguousarray(data)

    def run(self, feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.runner.run(feed, outputs)

    async def infer(self, request: InferRequest) -> InferResponse:
        feed, outputs = self.validate(request)
        results = await asyncio.to_thread(self.run, feed, outputs)
        tensors = [
            InferTensor(name, v2_datatype(array), tuple(array.shape), array)
            for name, array in zip(outputs, results, strict=True)
        ]
        return InferResponse(self.card.name, self.card.version, request.id, tensors)

    async def classify(self, pixels: np.ndarray) -> Classification:
        """Class and confidence per row: the convenience the native API offers."""
        spec = self.card.inputs[0]
        request = InferRequest(
            self.card.name, None,
            [InferTensor(spec.name, "FP32", tuple(pixels.shape), pixels.astype(np.float32, copy=False))],
            [self.card.scores_output],
        )  # fmt: skip
        scores = (await self.infer(request)).outputs[0].data
        probabilities = softmax(scores) if self.card.scores_kind == "logits" else scores
        return Classification(
            probabilities.argmax(1).astype(int).tolist(), probabilities.max(1).astype(float).tolist()
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)

"""Pure encoders and checkers for the gate's V2 requests (REST JSON, REST binary, gRPC).

One digit per request. An answer counts as right only if it is well-formed: 10 finite class
scores for one row (`logits`, or `probabilities` from the scikit-learn model), a `label`
output (if any) agreeing with them and a model version. Anything else raises `WrongAnswer`,
so a 200 with a wrong body is a failed request, not a success.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb2

N_CLASSES = 10
INPUT_NAME = "input"
HEADER_LENGTH = "Inference-Header-Content-Length"
_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
}


class WrongAnswer(ValueError):
    """The server answered, but not with a valid classification of the digit sent."""


@dataclass(frozen=True)
class Prediction:
    predicted: int
    confidence: float
    model_version: str


def _tensor(row: np.ndarray) -> dict:
    return {"name": INPUT_NAME, "shape": [1, int(row.size)], "datatype": "FP32"}


# The gate measures the model path, not the response cache: a stable slot whose cache is warm
# from earlier traffic would otherwise look faster than an identical, freshly started candidate.
NO_CACHE = {"cache": False}


def to_json_body(row: np.ndarray) -> bytes:
    tensor = {**_tensor(row), "data": row.astype(np.float32).ravel().tolist()}
    return json.dumps({"inputs": [tensor], "parameters": NO_CACHE}, separators=(",", ":")).encode()


def to_binary_body(row: np.ndarray) -> tuple[bytes, int]:
    """Triton's binary tensor extension: JSON header, then the raw little-endian FP32 bytes.
    Returns the body and the header length (for `Inference-Header-Content-Length`)."""
    raw = np.ascontiguousarray(row, dtype="<f4").tobytes()
    tensor = {**_tensor(row), "parameters": {"binary_data_size": len(raw)}}
    request = {"inputs": [tensor], "parameters": {"binary_data_output": False, **NO_CACHE}}
    header = json.dumps(request, separators=(",", ":")).encode()
    return header + raw, len(header)


def to_grpc_request(row: np.ndarray, model: str) -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name=model)
    request.parameters["cache"].bool_param = False
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[1, int(row.size)])
    request.raw_input_contents.append(np.ascontiguousarray(row, dtype="<f4").tobytes())
    return request


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def from_outputs(outputs: dict[str, np.ndarray], model_version: str) -> Prediction:
    """Check the decoded outputs of one answer and read its class and confidence."""
    if not model_version:
        raise WrongAnswer("the answer carries no model version")
    if "logits" in outputs:
        scores = outputs["logits"]
    elif "probabilities" in outputs:
        scores = outputs["probabilities"]
    else:
        raise WrongAnswer(f"no logits or probabilities among outputs {sorted(outputs)}")
    if scores.shape != (1, N_CLASSES) or not np.isfinite(scores).all():
        raise WrongAnswer(f"class scores of shape {list(scores.shape)} (want [1, {N_CLASSES}], finite)")
    if "logits" in outputs:
        probabilities = _softmax(scores[0].astype(np.float64))
    else:
        probabilities = scores[0].astype(np.float64)
        if probabilities.min() < -1e-6 or abs(probabilities.sum() - 1) > 1e-3:
            raise WrongAnswer("probabilities are not a distribution")
    predicted = int(probabilities.argmax())
    if "label" in outputs:
        label = outputs["label"].ravel()
        if label.size != 1 or int(label[0]) != predicted:
            raise WrongAnswer(f"label output {label.tolist()} disagrees with the scores' class {predicted}")
    return Prediction(predicted, float(probabilities[predicted]), model_version)


def from_rest_answer(body: bytes) -> Prediction:
    """A V2 REST JSON answer -> its prediction (binary outputs are not requested)."""
    try:
        payload = json.loads(body)
        outputs = {o["name"]: np.asarray(o["data"], dtype=np.float64).reshape(o["shape"]) for o in payload["outputs"]}
        return from_outputs(outputs, str(payload.get("model_version") or ""))
    except WrongAnswer:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise WrongAnswer(f"malformed V2 answer: {exc!r}") from None


def from_grpc_answer(response: pb2.ModelInferResponse) -> Prediction:
    """A V2 gRPC answer (outputs in `raw_output_contents`) -> its prediction."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise WrongAnswer(f"{len(response.raw_output_contents)} raw contents for {len(response.outputs)} outputs")
    outputs = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = _DTYPES.get(tensor.datatype)
        if dtype is None:
            raise WrongAnswer(f"unexpected datatype {tensor.datatype} of output {tensor.name}")
        try:
            outputs[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
        except ValueError as exc:
            raise WrongAnswer(f"output {tensor.name}: {exc}") from None
    return from_outputs(outputs, response.model_version)

"""Request bodies: one fixed real digit (or a few) from the test split, in every wire format.

Every contender gets the same pixels; each body is encoded once, before any load runs, so
the load generators only replay bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

V2_INPUT = "input"
V2_OUTPUT = "logits"
BINARY_HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Payload:
    """One request as bytes, with the headers it needs and the rows it carries."""

    body: bytes
    content_type: str
    rows: int
    headers: tuple[tuple[str, str], ...] = ()
    request_ids: int = 0  # > 0: each request its own X-Request-Id, bench-<k> for k modulo this (REST only)


def sample_rows(rows: int = 1) -> np.ndarray:
    """The first `rows` digits of the fixed test split, raw 0-16 float32 pixels, shape [rows, 64]."""
    from models.data import load_split

    return np.ascontiguousarray(load_split().x_test[:rows], dtype=np.float32)


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def to_v2_json(x: np.ndarray) -> Payload:
    """V2 REST JSON (also the hand-written FastAPI server's shape)."""
    body = {"inputs": [{"name": V2_INPUT, "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    return Payload(_json(body), "application/json", len(x))


def to_v2_binary(x: np.ndarray) -> Payload:
    """V2 REST with Triton's binary tensor extension, both ways (input and output as raw bytes)."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = _json(
        {
            "inputs": [
                {
                    "name": V2_INPUT,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": V2_OUTPUT, "parameters": {"binary_data": True}}],
        }
    )
    return Payload(header + raw, "application/octet-stream", len(x), ((BINARY_HEADER, str(len(header))),))


def to_plain_bentoml(x: np.ndarray) -> Payload:
    """The plain BentoML service's native JSON: `{"pixels": [[...]]}`."""
    return Payload(_json({"pixels": x.tolist()}), "application/json", len(x))


def to_mlflow(x: np.ndarray) -> Payload:
    """MLflow's scoring server, tensor input: `{"inputs": [[...]]}`."""
    return Payload(_json({"inputs": x.tolist()}), "application/json", len(x))


def to_grpc(x: np.ndarray, model: str = "digits") -> Payload:
    """A serialized V2 gRPC `ModelInferRequest` (raw input contents)."""
    from tritonclient.grpc import service_pb2 as pb2

    request = pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = V2_INPUT, "FP32"
    tensor.shape.extend(x.shape)
    request.outputs.add().name = V2_OUTPUT
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return Payload(request.SerializeToString(), "application/grpc", len(x))

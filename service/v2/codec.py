"""Pure converters between V2 REST JSON bodies and the core's request/response types."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.core.errors import InvalidInput
from service.core.tensors import V2_TO_NUMPY, InferRequest, InferResponse, InferTensor


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON body: {exc}") from None


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def from_json_tensor(item: Any, index: int) -> InferTensor:
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object")
    name, datatype = item.get("name"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string")
    if datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"{where} ({name}): unsupported datatype {datatype!r}")
    shape = _shape(item.get("shape"), f"{where} ({name})")
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where} ({name}): 'parameters' must be an object")
    if "data" not in item:
        raise InvalidInput(f"{where} ({name}): 'data' is missing")
    try:
        data = np.asarray(item["data"], dtype=V2_TO_NUMPY[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{where} ({name}): 'data' is not a (nested) list of {datatype} values") from None
    return InferTensor(name, datatype, shape, data, parameters)


def from_json_request(body: bytes, model_name: str, model_version: str | None) -> InferRequest:
    payload = _parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    outputs = payload.get("outputs")
    names: list[str] | None = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in outputs]
    request_id = payload.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=[from_json_tensor(item, i) for i, item in enumerate(inputs)],
        outputs=names or None,
        id=request_id,
        parameters=payload.get("parameters") or {},
    )


def to_json_response(response: InferResponse) -> dict[str, Any]:
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": t.data.reshape(-1).tolist()}
            for t in response.outputs
        ],
    }

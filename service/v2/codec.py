"""Pure converters between V2 REST JSON bodies and the core's request/response types.

Hostile bodies end in `InvalidInput` (400) or `PayloadTooLarge` (413), never anything else:
one JSON parser (orjson, which refuses NaN/Infinity and nesting past 1024 levels), ASCII-only
byte counts, and every tensor's size checked against its shape, and its shape against
`max_elements`, before any value is converted.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import orjson

from service.core.errors import InvalidInput
from service.core.tensors import V2_TO_NUMPY, InferRequest, InferResponse, InferTensor, check_size

# An Inference-Header-Content-Length: ASCII digits only (str.isdigit accepts "²"), and few
# enough that int() never meets Python's 4,300-digit conversion limit.
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")
_NON_FINITE = re.compile(rb"(?<![A-Za-z\"])-?(?:NaN|Infinity)(?![A-Za-z\"])")


def parse_json(body: bytes) -> Any:
    """orjson only (5-10x the standard library on V2 bodies). It refuses the NaN/Infinity
    literals some clients send: those get a message of their own, found only once parsing
    failed, so a valid body pays nothing for it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _NON_FINITE.search(body):
            raise InvalidInput("NaN and Infinity are not JSON numbers; send finite values") from None
        raise InvalidInput(f"malformed JSON body: {exc}") from None


def dump_json(payload: Any) -> bytes:
    """Compact JSON; NaN and Inf become null (orjson), never invalid JSON."""
    return orjson.dumps(payload)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def from_json_tensor(
    item: Any, index: int, binary: memoryview | None = None, offset: list[int] | None = None,
    max_elements: int | None = None,
) -> InferTensor:  # fmt: skip
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"{where} must be an object")
    name, datatype = item.get("name"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string")
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"{where} ({name}): unsupported datatype {str(datatype)[:40]!r}")
    shape = _shape(item.get("shape"), f"{where} ({name})")
    count = check_size(shape, max_elements, f"{where} ({name})")
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where} ({name}): 'parameters' must be an object")
    if "binary_data_size" in parameters:
        return InferTensor(
            name, datatype, shape, _take_binary(parameters, binary, offset, datatype, f"{where} ({name})"), parameters
        )
    if "data" not in item:
        raise InvalidInput(f"{where} ({name}): 'data' is missing (and no 'binary_data_size' parameter)")
    values = item["data"]
    # Flat (one entry per value) or nested (one entry per row): anything longer is refused
    # before numpy converts it.
    if not isinstance(values, list):
        raise InvalidInput(f"{where} ({name}): 'data' must be a list")
    nested = bool(values) and isinstance(values[0], list)
    if nested and (not shape or len(values) != shape[0]):
        raise InvalidInput(f"{where} ({name}): 'data' holds {len(values)} rows, shape {list(shape)} needs {shape[:1]}")
    if not nested and len(values) != count:
        raise InvalidInput(f"{where} ({name}): 'data' holds {len(values)} values, shape {list(shape)} needs {count}")
    try:
        with np.errstate(over="ignore"):  # 1e300 as FP32 becomes inf, which validation refuses
            data = np.asarray(values, dtype=V2_TO_NUMPY[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"{where} ({name}): 'data' is not a (nested) list of {datatype} values") from None
    if data.size != count:
        raise InvalidInput(f"{where} ({name}): 'data' holds {data.size} values, shape {list(shape)} needs {count}")
    return InferTensor(name, datatype, shape, data, parameters)


def _take_binary(
    parameters: dict, binary: memoryview | None, offset: list[int] | None, datatype: str, where: str
) -> np.ndarray:
    """Slice this tensor's bytes off the binary tail (Triton's binary tensor extension)."""
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}: 'binary_data_size' must be a non-negative integer")
    if binary is None or offset is None:
        raise InvalidInput(f"{where}: 'binary_data_size' given but the request has no Inference-Header-Content-Length")
    start = offset[0]
    if start + size > len(binary):
        raise InvalidInput(f"{where}: 'binary_data_size' {size} runs past the end of the body")
    offset[0] = start + size
    itemsize = V2_TO_NUMPY[datatype].itemsize
    if size % itemsize:
        raise InvalidInput(f"{where}: {size} bytes is not a whole number of {datatype} values")
    return np.frombuffer(binary[start : start + size], dtype=V2_TO_NUMPY[datatype])


def from_request_body(
    body: bytes, header_length: str | None, model_name: str, model_version: str | None,
    max_elements: int | None = None,
) -> InferRequest:  # fmt: skip
    """Decode a V2 inference body: plain JSON, or JSON + binary tensors when the
    `Inference-Header-Content-Length` header says where the JSON ends. `max_elements`
    bounds each input's value count (None: unbounded)."""
    if header_length is None:
        return from_json_request(body, model_name, model_version, max_elements=max_elements)
    if not _BYTE_COUNT.fullmatch(header_length) or int(header_length) > len(body):
        shown = header_length if len(header_length) <= 40 else header_length[:37] + "..."
        raise InvalidInput(
            f"Inference-Header-Content-Length {shown!r} must be a byte count within the {len(body)}-byte body"
        )
    split = int(header_length)
    return from_json_request(body[:split], model_name, model_version, memoryview(body)[split:], max_elements)


def _output_names(outputs: Any) -> tuple[list[str], set[str]]:
    """The requested outputs' names, and those asked for as binary data."""
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    names, binary = [], set()
    for index, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        parameters = output.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidInput(f"outputs[{index}] ({output['name']}): 'parameters' must be an object")
        names.append(output["name"])
        if (parameters or {}).get("binary_data") is True:
            binary.add(output["name"])
    return names, binary


def from_json_request(
    body: bytes, model_name: str, model_version: str | None, binary: memoryview | None = None,
    max_elements: int | None = None,
) -> InferRequest:  # fmt: skip
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    outputs = payload.get("outputs")
    names, binary_outputs = _output_names(outputs) if outputs is not None else ([], set())
    request_id = payload.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    offset = [0]
    tensors = [from_json_tensor(item, i, binary, offset, max_elements) for i, item in enumerate(inputs)]
    if binary is not None and offset[0] != len(binary):
        raise InvalidInput(f"{len(binary) - offset[0]} bytes of binary data are not claimed by any input")
    if parameters.get("binary_data_output") is True:
        binary_outputs.add("*")
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=tensors,
        outputs=names or None,
        id=request_id,
        parameters={**parameters, "binary_outputs": binary_outputs},
    )


def to_response_body(response: InferResponse, binary_outputs: set[str]) -> tuple[bytes, int | None]:
    """Encode an answer; outputs named in `binary_outputs` ("*" = all) go as raw bytes after
    the JSON. Returns the body and the JSON length for Inference-Header-Content-Length
    (None when the answer is plain JSON)."""
    if not binary_outputs:
        return dump_json(to_json_response(response)), None
    header = to_json_response(response, binary_outputs)
    head = dump_json(header)
    tails = [
        np.ascontiguousarray(t.data, dtype=t.data.dtype.newbyteorder("<")).tobytes()
        for t in response.outputs
        if _is_binary(t.name, binary_outputs)
    ]
    return b"".join([head, *tails]), len(head)


def _is_binary(name: str, binary_outputs: set[str]) -> bool:
    return "*" in binary_outputs or name in binary_outputs


def to_json_response(response: InferResponse, binary_outputs: set[str] | None = None) -> dict[str, Any]:
    binary_outputs = binary_outputs or set()
    outputs = []
    for t in response.outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if _is_binary(t.name, binary_outputs):
            entry["parameters"] = {"binary_data_size": int(t.data.nbytes)}
        else:
            entry["data"] = t.data.reshape(-1).tolist()
        outputs.append(entry)
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    }

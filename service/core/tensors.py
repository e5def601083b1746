"""V2 tensor datatypes and the transport-free request/response types."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from service.core.errors import InvalidInput, PayloadTooLarge

# V2 datatype -> numpy dtype (little-endian). BYTES is variable length and not used by
# the digits models, so it is rejected as a datatype mismatch rather than decoded.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}
ONNX_TO_V2 = {
    "float": "FP32", "double": "FP64", "float16": "FP16", "int64": "INT64", "int32": "INT32",
    "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "bool": "BOOL",
}  # fmt: skip


def v2_datatype(array: np.ndarray) -> str:
    try:
        return NUMPY_TO_V2[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError:
        raise InvalidInput(f"unsupported tensor dtype {array.dtype}") from None


def check_size(shape: tuple[int, ...], max_elements: int | None, where: str) -> int:
    """The shape's value count, refused (413) past `max_elements` before anything is read."""
    count = math.prod(shape)  # Python ints: a hostile shape cannot overflow into a small count
    if max_elements is not None and count > max_elements:
        raise PayloadTooLarge(
            f"{where}: shape {list(shape)} holds {count} values; one input may carry at most {max_elements}"
        )
    return count


@dataclass(frozen=True)
class TensorSpec:
    """A declared model input or output; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class InferTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict = field(default_factory=dict)


@dataclass
class InferRequest:
    model_name: str
    model_version: str | None
    inputs: list[InferTensor]
    outputs: list[str] | None = None  # None: all declared outputs
    id: str = ""
    parameters: dict = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[InferTensor]

"""How a batch of predictions travels from the serving process to its log writer process.

One frame per batch: an 8-byte header (two little-endian uint32: the columns' length, the
inputs' length), the columns as one JSON object (request ids, times, protocols, shadow flags,
latencies, datatypes, shapes, classes, confidences) and every input's little-endian bytes one
after the other. Packing is a handful of list comprehensions and one join: the serving
process's share of the log's work, a few microseconds a row (`make bench`, bento-predlog).
Both ends are our own processes on a private pipe; a frame that does not parse is a bug, and
`unpack` raises ValueError for it.
"""

from __future__ import annotations

import math
import struct
import sys

import numpy as np
import orjson

from service.core.predlog import Prediction, input_bytes
from service.core.tensors import V2_TO_NUMPY

HEADER = struct.Struct("<II")
_NATIVE_LITTLE = sys.byteorder == "little"
MAX_FRAME = 1 << 30


def pack(batch: list[Prediction]) -> bytes:
    """The frame for `batch` (NaN and infinite confidences travel as strings)."""
    confidences = [p.confidences for p in batch]
    columns = orjson.dumps(
        {
            "id": [p.request_id for p in batch],
            "t": [p.time for p in batch],
            "p": [p.protocol for p in batch],
            "s": [p.shadow for p in batch],
            "l": [p.latency_s for p in batch],
            "d": [p.datatype for p in batch],
            "shape": [p.inputs.shape for p in batch],
            "c": [p.classes for p in batch],
            "f": confidences if _all_finite(confidences) else [[_float_text(x) for x in c] for c in confidences],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    inputs = b"".join(_little_bytes(p.inputs) for p in batch)
    return HEADER.pack(len(columns), len(inputs)) + columns + inputs


def _little_bytes(array: np.ndarray) -> bytes | memoryview:
    """`input_bytes`, at a tenth of its cost when the array is already little-endian."""
    order = array.dtype.byteorder
    return array.tobytes() if order == "<" or order == "|" or (order == "=" and _NATIVE_LITTLE) else input_bytes(array)


def _all_finite(lists: list[list[float]]) -> bool:
    try:
        return all(math.isfinite(x) for c in lists for x in c)
    except TypeError:
        return False


def _float_text(x: float) -> float | str:
    return x if isinstance(x, int | float) and math.isfinite(x) else repr(float(x))


def unpack(columns: bytes, inputs: bytes) -> list[Prediction]:
    """The predictions of one frame (its two parts after the header)."""
    try:
        c = orjson.loads(columns)
        out, offset = [], 0
        for i, request_id in enumerate(c["id"]):
            dtype = np.dtype(V2_TO_NUMPY[c["d"][i]]).newbyteorder("<")
            shape = tuple(int(n) for n in c["shape"][i])
            size = dtype.itemsize * math.prod(shape)
            array = np.frombuffer(inputs, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            offset += size
            confidences = [float(x) for x in c["f"][i]]  # "nan", "inf" back to floats
            out.append(
                Prediction(
                    request_id,
                    c["t"][i],
                    c["p"][i],
                    bool(c["s"][i]),
                    c["l"][i],
                    array,
                    c["d"][i],
                    c["c"][i],
                    confidences,
                )  # fmt: skip
            )
        if offset != len(inputs):
            raise ValueError(f"{len(inputs) - offset} input bytes left over")
        return out
    except (KeyError, IndexError, TypeError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"unreadable prediction frame: {exc}") from None

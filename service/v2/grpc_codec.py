"""Pure converters between V2 gRPC messages and the core's request/response types.

The messages are tritonclient's generated `inference.*` classes (`tritonclient.grpc.
service_pb2`), never our own copy: two registrations of the same protobuf names in one
process clash. Inputs arrive either as `raw_input_contents` (little-endian bytes, one
entry per input in order; what `tritonclient.grpc` always sends) or as typed
`InferInputTensor.contents`; answers always use `raw_output_contents`, the only form
`tritonclient.grpc`'s `InferResult.as_numpy()` reads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb2

from service.core.errors import InvalidInput
from service.core.model import ModelCard
from service.core.tensors import V2_TO_NUMPY, InferRequest, InferResponse, InferTensor, TensorSpec, check_size

# Typed `contents` field per datatype, with the dtype protobuf hands its values in.
# FP16 (and BF16) have no typed field in the protocol: they travel raw only.
_TYPED_FIELDS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}
_CONTENT_FIELDS = tuple(f.name for f in pb2.InferTensorContents.DESCRIPTOR.fields)


def from_infer_parameters(parameters: Any) -> dict[str, Any]:
    """`map<string, InferParameter>` -> plain dict; an unset oneof becomes None."""
    return {key: (getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None)
            for key, p in parameters.items()}  # fmt: skip


def _has_typed_contents(tensor: pb2.InferInputTensor) -> bool:
    # tritonclient never sets `contents`: one presence check instead of eleven field lengths
    return tensor.HasField("contents") and any(len(getattr(tensor.contents, name)) for name in _CONTENT_FIELDS)


def _datatype_and_shape(tensor: pb2.InferInputTensor, where: str) -> tuple[str, tuple[int, ...]]:
    if tensor.datatype == "BYTES":
        raise InvalidInput(f"{where}: datatype BYTES is not supported by this model")
    if tensor.datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"{where}: unsupported datatype {tensor.datatype!r}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: shape {list(shape)} has a negative dimension")
    return tensor.datatype, shape


def _from_raw(raw: bytes, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    dtype = V2_TO_NUMPY[datatype]
    # math.prod on Python ints: a hostile shape cannot overflow into a small byte count.
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"{where}: raw contents hold {len(raw)} bytes, shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype)


def _from_typed(contents: pb2.InferTensorContents, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    if datatype not in _TYPED_FIELDS:
        raise InvalidInput(f"{where}: {datatype} has no typed contents field; send it in raw_input_contents")
    field, wire_dtype = _TYPED_FIELDS[datatype]
    stray = [name for name in _CONTENT_FIELDS if name != field and len(getattr(contents, name))]
    if stray:
        raise InvalidInput(f"{where}: a {datatype} tensor carries its values in {field}, got {stray}")
    repeated = getattr(contents, field)
    if len(repeated) != math.prod(shape):  # counted before numpy converts anything
        raise InvalidInput(
            f"{where}: {field} holds {len(repeated)} values, shape {list(shape)} needs {math.prod(shape)}"
        )
    values = np.asarray(repeated, dtype=wire_dtype)
    target = V2_TO_NUMPY[datatype]
    if target.kind in "iu" and target != wire_dtype and values.size:
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidInput(f"{where}: values out of range for {datatype}")
    return values.astype(target, copy=False)


def from_model_infer_request(request: pb2.ModelInferRequest, max_elements: int | None = None) -> InferRequest:
    """`ModelInferRequest` -> `InferRequest`; any malformation raises `InvalidInput`, an
    input whose shape holds more than `max_elements` values `PayloadTooLarge`.

    Either every input is raw (`raw_input_contents` has exactly one entry per input and
    no input carries typed contents) or none is; a mixture is rejected.
    """
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    tensors = []
    for index, tensor in enumerate(request.inputs):
        where = f"inputs[{index}] ({tensor.name})"
        datatype, shape = _datatype_and_shape(tensor, where)
        check_size(shape, max_elements, where)
        typed = _has_typed_contents(tensor)
        if raw and typed:
            raise InvalidInput(f"{where}: typed contents and raw_input_contents cannot be mixed")
        data = (
            _from_raw(raw[index], datatype, shape, where)
            if raw
            else _from_typed(tensor.contents, datatype, shape, where)
        )
        tensors.append(InferTensor(tensor.name, datatype, shape, data, from_infer_parameters(tensor.parameters)))
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version or None,
        inputs=tensors,
        outputs=[o.name for o in request.outputs] or None,
        id=request.id,
        parameters=from_infer_parameters(request.parameters),
    )


def to_model_infer_response(response: InferResponse) -> pb2.ModelInferResponse:
    """`InferResponse` -> `ModelInferResponse` with little-endian `raw_output_contents`."""
    message = pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        data = np.ascontiguousarray(tensor.data, dtype=V2_TO_NUMPY[tensor.datatype])
        message.raw_output_contents.append(data.tobytes())
    return message


def _to_tensor_metadata(spec: TensorSpec) -> pb2.ModelMetadataResponse.TensorMetadata:
    return pb2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def to_model_metadata_response(card: ModelCard) -> pb2.ModelMetadataResponse:
    """The card as `ModelMetadataResponse`; a variable dimension (the batch one) is -1."""
    return pb2.ModelMetadataResponse(
        name=card.name,
        versions=[card.version],
        platform=card.platform,
        inputs=[_to_tensor_metadata(s) for s in card.inputs],
        outputs=[_to_tensor_metadata(s) for s in card.outputs],
    )

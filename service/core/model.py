"""`ModelCard`: what the service knows about the model it serves, from its store labels."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from service.core.tensors import ONNX_TO_V2, TensorSpec

_TENSOR = re.compile(r"^(?P<name>[^:]+):(?P<dtype>\w+)\[(?P<dims>[-\d,]*)\]$")


def parse_tensor_specs(text: str) -> tuple[TensorSpec, ...]:
    """Parse the store label form `name:float[-1,64];other:int64[-1]`."""
    specs = []
    for part in filter(None, text.split(";")):
        match = _TENSOR.match(part)
        if match is None:
            raise ValueError(f"bad tensor label {part!r}")
        dims = tuple(int(d) for d in match["dims"].split(",") if d)
        specs.append(TensorSpec(match["name"], ONNX_TO_V2.get(match["dtype"], match["dtype"].upper()), dims))
    return tuple(specs)


@dataclass(frozen=True)
class ModelCard:
    """Identity and tensor contract of the served model. The version is the registry's."""

    name: str
    version: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    scores_output: str
    scores_kind: str  # "logits" or "probabilities"
    input_range: tuple[float, float] | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    platform: str = "onnxruntime_onnx"

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> ModelCard:
        low, _, high = labels.get("input_range", "").partition(",")
        return cls(
            name=labels["registered_model"],
            version=labels["model_version"],
            sha256=labels["sha256"],
            inputs=parse_tensor_specs(labels["inputs"]),
            outputs=parse_tensor_specs(labels["outputs"]),
            scores_output=labels["scores_output"],
            scores_kind=labels.get("scores_kind", "logits"),
            input_range=(float(low), float(high)) if high else None,
            lineage={
                k: labels[k] for k in ("run_id", "architecture", "onnx_test_accuracy", "precision") if k in labels
            },
        )

    def output_spec(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)

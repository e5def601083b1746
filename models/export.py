"""Source model -> ONNX, with the ONNX checker and a numerical parity check.

`export_onnx` writes one self-contained .onnx file (no external data) with a dynamic batch
dimension; `check_parity` runs ONNX Runtime on the whole test split and refuses the graph
unless it reproduces the source model (max |score diff| <= atol, identical argmax).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.data import N_FEATURES
from models.errors import IntegrityError, ParityError

# One sha256 routine for export, the store and the serving side (which cannot import models/).
from service.core.runner import file_sha256 as sha256_of  # noqa: F401 - re-exported

INPUT_NAME = "input"
DEFAULT_ATOL = 1e-4


@dataclass(frozen=True)
class GraphContract:
    """What the serving side needs to know about an exported graph."""

    input_name: str
    scores_output: str  # the output holding class scores
    scores_kind: str  # "logits" or "probabilities"
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    argmax_agreement: float
    onnx_test_accuracy: float
    samples: int

    @property
    def passed(self) -> bool:
        return self.argmax_agreement == 1.0

    def as_tags(self) -> dict[str, str]:
        return {
            "parity_max_abs_diff": f"{self.max_abs_diff:.3g}",
            "parity_argmax_agreement": f"{self.argmax_agreement:.6f}",
            "parity_samples": str(self.samples),
            "onnx_test_accuracy": f"{self.onnx_test_accuracy:.6f}",
        }


def export_onnx(flavor: str, model: Any, target: Path) -> GraphContract:
    """Write `model` as ONNX to `target` and run the ONNX checker on it."""
    if flavor == "pytorch":
        contract = _export_torch(model, target)
    elif flavor == "sklearn":
        contract = _export_sklearn(model, target)
    else:  # pragma: no cover - the registry only produces the two flavors above
        raise ParityError(f"cannot export flavor {flavor!r} to ONNX")
    import onnx

    try:
        onnx.checker.check_model(str(target), full_check=True)
    except Exception as exc:  # the checker raises several types; all mean "not valid"
        raise IntegrityError(f"the ONNX checker rejected the exported graph: {exc}") from None
    refuse_external_data(target)
    return contract


def refuse_external_data(onnx_file: Path) -> None:
    """A graph whose weights live in other files is refused: the sha256 the service checks
    covers this one file only, so every byte the model runs must be in it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_file), load_external_data=False)
    external = [t.name for t in onnx.external_data_helper._get_all_tensors(model) if uses_external_data(t)]
    if external:
        raise IntegrityError(f"{onnx_file.name} keeps {len(external)} tensors in external files ({external[0]}...)")


def _export_torch(model: Any, target: Path) -> GraphContract:
    import torch

    # The dynamo exporter is chatty at WARNING level (missing torchvision ops etc.).
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    example = torch.zeros(2, N_FEATURES, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        input_names=[INPUT_NAME],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    return GraphContract(INPUT_NAME, "logits", "logits", ("logits",))


def _export_sklearn(model: Any, target: Path) -> GraphContract:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onnx_model = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={"zipmap": False},
        final_types=None,
        target_opset=18,
    )
    target.write_bytes(onnx_model.SerializeToString())
    outputs = tuple(o.name for o in onnx_model.graph.output)
    return GraphContract(INPUT_NAME, "probabilities", "probabilities", outputs)


def check_parity(
    onnx_file: Path,
    contract: GraphContract,
    reference_scores: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """Compare ONNX Runtime with the source model's scores; raise ParityError on mismatch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    scores = session.run([contract.scores_output], {contract.input_name: x})[0]
    if contract.scores_output not in names or scores.shape != reference_scores.shape:
        raise ParityError(f"ONNX output shape {scores.shape} != source {reference_scores.shape}")
    diff = float(np.abs(scores.astype(np.float64) - reference_scores.astype(np.float64)).max())
    agreement = float((scores.argmax(1) == reference_scores.argmax(1)).mean())
    report = ParityReport(diff, agreement, float((scores.argmax(1) == y).mean()), len(x))
    if diff > atol or agreement < 1.0:
        raise ParityError(
            f"ONNX parity check failed on {len(x)} test digits: max |score diff| {diff:.3g} "
            f"(allowed {atol:g}), argmax agreement {agreement:.2%}; the graph was not exported"
        )
    return report

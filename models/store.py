"""The BentoML model store side: import an exported ONNX graph with its lineage labels.

Model tag `digits:v<N>` mirrors MLflow registry version N. The labels carry the lineage
(registered name, version, run id, sha256, accuracy, tensor contract) that the Bento and
the service read back; the service re-checks the sha256 before it loads the file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from models.data import PIXEL_RANGE
from models.errors import IntegrityError, NotFoundError
from models.export import GraphContract, ParityReport, sha256_of
from models.registry import ModelVersionRef
from service.core.drift import REFERENCE_FILE, DriftReference

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class StoredModelRef:
    tag: str
    path: Path
    labels: dict[str, str]


def store_tag(ref: ModelVersionRef) -> str:
    return f"{ref.name}:v{ref.version}"


def tensor_labels(onnx_file: Path) -> dict[str, str]:
    """Input/output names, shapes and dtypes as the graph declares them (-1 = variable)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

    def describe(args: list) -> str:
        parts = []
        for arg in args:
            dims = ",".join(str(d) if isinstance(d, int) else "-1" for d in arg.shape)
            parts.append(f"{arg.name}:{arg.type.removeprefix('tensor(').rstrip(')')}[{dims}]")
        return ";".join(parts)

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def import_model(
    ref: ModelVersionRef,
    onnx_file: Path,
    contract: GraphContract,
    parity: ParityReport,
    architecture: str,
    accuracy: float | None = None,
    extra_labels: dict[str, str] | None = None,
    reference: DriftReference | None = None,
) -> StoredModelRef:
    """Save the ONNX file under `digits:v<N>`, replacing an older import of the same version.

    `accuracy` is the stored graph's test accuracy (default: the parity check's, fp32);
    `extra_labels` add lineage such as the precision of a quantised graph; `reference` (the
    training inputs' distribution) goes next to the graph for the slots' input-drift figure."""
    import bentoml
    from bentoml.exceptions import NotFound

    sha = sha256_of(onnx_file)
    labels = {
        "registered_model": ref.name,
        "model_version": str(ref.version),
        "run_id": ref.run_id,
        "sha256": sha,
        "architecture": architecture,
        "onnx_test_accuracy": f"{parity.onnx_test_accuracy if accuracy is None else accuracy:.6f}",
        "scores_output": contract.scores_output,
        "scores_kind": contract.scores_kind,
        "input_range": f"{PIXEL_RANGE[0]:g},{PIXEL_RANGE[1]:g}",
        **tensor_labels(onnx_file),
        **(extra_labels or {}),
    }
    tag = store_tag(ref)
    try:
        bentoml.models.delete(tag)
    except NotFound:
        pass
    # bentoml.models.create writes to a temporary folder and only moves it into the store
    # when the block exits cleanly: a failure leaves nothing half-written.
    with bentoml.models.create(tag, labels=labels, metadata={"source_uri": ref.uri}) as model:
        shutil.copyfile(onnx_file, model.path_of(ONNX_FILE))
        if reference is not None:
            Path(model.path_of(REFERENCE_FILE)).write_text(reference.to_json())
    return get_stored(tag)


def get_stored(tag: str) -> StoredModelRef:
    """A model in the store, with its file checked against the sha256 it was imported with."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise NotFoundError(f"model {tag} is not in the BentoML store: run `canary export` for it first") from None
    path = Path(model.path_of(ONNX_FILE))
    labels = dict(model.info.labels)
    if not path.is_file():
        raise IntegrityError(f"model {tag} in the BentoML store has no {ONNX_FILE}; re-run `canary export`")
    actual = sha256_of(path)
    if actual != labels.get("sha256"):
        raise IntegrityError(
            f"model {tag}: {ONNX_FILE} has sha256 {actual[:12]}..., its lineage says "
            f"{labels.get('sha256', '?')[:12]}...; the file is corrupt, re-run `canary export`"
        )
    return StoredModelRef(str(model.tag), path, labels)

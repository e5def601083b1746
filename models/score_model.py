"""The graph batch scoring runs: a registry version's exported ONNX file, checked, and the
one prediction function both engines call.

`resolve_scoring_model` accepts a version only if its file's sha256 is the one the BentoML
store, the registry (`onnx_sha256`, written by export) and, when it is built, the Bento
(`model_sha256`) all record. `predict` runs that file through the service's own
`OnnxRunner` and turns scores into class + confidence exactly as the served native API does
(softmax over logits, argmax, max), so a file scored here answers like the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.errors import CanaryError, IntegrityError
from service.core.inference import softmax
from service.core.model import ModelCard
from service.core.runner import ModelIntegrityError, OnnxRunner

if TYPE_CHECKING:  # the scoring workers import this module: keep MLflow and settings out of them
    from models.home import CanaryHome
    from models.registry import ModelVersionRef

# Rows per ONNX Runtime call inside a chunk: small batches stay in the CPU cache (measured
# on digits-cnn, one thread: 256 rows ran ~10% faster than 16,384).
INFER_ROWS = 256


@dataclass(frozen=True)
class ScoringModel:
    """A registry version ready to score: its card (tensor contract, sha256) and file."""

    ref: ModelVersionRef
    card: ModelCard
    path: Path

    @property
    def sha256(self) -> str:
        return self.card.sha256

    @property
    def width(self) -> int:
        """Values per row of the one input, e.g. 64 pixels."""
        return self.card.inputs[0].shape[1]

    @property
    def scores_width(self) -> int:
        spec = self.card.output_spec(self.card.scores_output)
        return spec.shape[-1] if spec is not None and spec.shape[-1] > 0 else -1


@dataclass(frozen=True)
class Predictions:
    """One chunk's answers, row for row: class, confidence and the raw scores."""

    classes: np.ndarray  # int64 (n,)
    confidences: np.ndarray  # float32 (n,)
    scores: np.ndarray  # float32 (n, classes): logits or probabilities, as the graph outputs them

    def __len__(self) -> int:
        return len(self.classes)


def parse_release(release: str) -> tuple[int | None, str | None]:
    """A release argument: "3" is version 3, "@champion" is alias champion."""
    if release.startswith("@") and len(release) > 1:
        return None, release[1:]
    if release.isdigit():
        return int(release), None
    raise CanaryError(f"{release!r} is not a model version or @alias (e.g. 3 or @champion)")


def resolve_scoring_model(home: CanaryHome, release: str) -> ScoringModel:
    """A version or @alias -> its exported graph, refused unless every record agrees on its sha256."""
    from models.pipeline import resolve_stored

    version, alias = parse_release(release)
    ref, stored = resolve_stored(home, version, alias)  # checks the file against the store's sha256
    sha = stored.labels["sha256"]
    registered = ref.tags.get("onnx_sha256")
    if registered != sha:
        raise IntegrityError(
            f"{ref.label}: the exported graph has sha256 {sha[:12]}..., the registry records "
            f"{(registered or 'none')[:12]}...; re-run `canary export --version {ref.version}`"
        )
    bento_sha = _bento_sha256(ref.version)
    if bento_sha is not None and bento_sha != sha:
        raise IntegrityError(
            f"{ref.label}: Bento digits-service:v{ref.version} was built from sha256 {bento_sha[:12]}..., the "
            f"exported graph is {sha[:12]}...; rebuild it with `canary build --version {ref.version}`"
        )
    card = ModelCard.from_labels(stored.labels)
    spec = card.inputs[0] if len(card.inputs) == 1 else None
    if spec is None or len(spec.shape) != 2 or spec.shape[1] < 1 or spec.datatype != "FP32":
        raise CanaryError(
            f"{ref.label}: batch scoring needs one FP32 input of shape [-1, N], the card has {card.inputs}"
        )
    return ScoringModel(ref, card, stored.path)


def _bento_sha256(version: int) -> str | None:
    """The `model_sha256` label of the version's Bento, None when no Bento is built for it."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.bentos.get(f"digits-service:v{version}").info.labels.get("model_sha256", "")
    except NotFound:
        return None


def open_runner(path: Path, card: ModelCard, threads: int) -> OnnxRunner:
    """The service's runner on `path`; it hashes the bytes it loads and refuses a mismatch."""
    try:
        return OnnxRunner(path, card, intra_op_threads=threads)
    except ModelIntegrityError as exc:
        raise IntegrityError(f"refused to load the model: {exc}") from None


def predict(runner: OnnxRunner, features: np.ndarray) -> Predictions:
    """Class, confidence and scores per row of a float32 (n, width) array."""
    card = runner.card
    name = card.inputs[0].name
    if len(features) == 0:  # an empty Spark partition
        empty = np.empty((0, 0), dtype=np.float32)
        return Predictions(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), empty)
    parts = [
        runner.run({name: features[start : start + INFER_ROWS]}, [card.scores_output])[0]
        for start in range(0, len(features), INFER_ROWS)
    ]
    scores = np.concatenate(parts) if len(parts) != 1 else parts[0]
    # The served native API's rule (InferenceCore.probabilities): softmax over logits only.
    probabilities = softmax(scores) if card.scores_kind == "logits" else scores
    return Predictions(
        probabilities.argmax(1).astype(np.int64),
        probabilities.max(1).astype(np.float32),
        np.ascontiguousarray(scores, dtype=np.float32),
    )

"""`OnnxRunner`: one ONNX Runtime session, tuned, verified and warmed before use."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from service.core.model import ModelCard


class ModelIntegrityError(RuntimeError):
    """The model file's bytes do not match the sha256 of its lineage: refuse to serve."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OnnxRunner:
    """Runs batches through ONNX Runtime. `run` is the pure batch function batching wraps."""

    def __init__(
        self, path: Path, card: ModelCard, intra_op_threads: int = 0, workers: int = 1, spinning: bool = False
    ) -> None:
        import onnxruntime as ort

        # Read once, hash those bytes and hand the very same bytes to ONNX Runtime: reopening
        # the file by path would let it change between the check and the load.
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != card.sha256:
            raise ModelIntegrityError(f"{path} has sha256 {actual}, lineage says {card.sha256}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # By default the cores are divided among the worker processes, so workers never
        # oversubscribe the CPU with ONNX Runtime threads.
        options.intra_op_num_threads = intra_op_threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        options.inter_op_num_threads = 1
        # Spinning threads burn a core between batches: the event loop needs it more.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.card = card
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, inputs)

    def warm_up(self, rows: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run a few batch sizes so the first real request does not pay for allocation."""
        spec = self.card.inputs[0]
        width = [d for d in spec.shape[1:]]
        for n in rows:
            self.run({spec.name: np.zeros((n, *width), dtype=np.float32)}, [o.name for o in self.card.outputs])

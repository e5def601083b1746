"""A tiny real ONNX classifier built with onnx.helper (no training), for core-level tests.

Same contract as the exported digits models: input `input` FP32 [-1, 64] raw pixels
(scaled by 1/16 inside the graph), output `logits` FP32 [-1, 10].
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from service.core.inference import InferenceCore
from service.core.model import ModelCard
from service.core.runner import OnnxRunner
from service.core.tensors import TensorSpec


def write_tiny_onnx(path: Path, seed: int = 0) -> str:
    """Write the model to `path`; return its sha256."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(64, 10)).astype(np.float32)
    bias = rng.normal(size=(10,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["input", "scale"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(np.array(16.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_card(sha256: str, version: str = "1", name: str = "digits") -> ModelCard:
    return ModelCard(
        name=name,
        version=version,
        sha256=sha256,
        inputs=(TensorSpec("input", "FP32", (-1, 64)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        scores_output="logits",
        scores_kind="logits",
        input_range=(0.0, 16.0),
        lineage={"run_id": "test-run", "architecture": "tiny"},
    )


def tiny_core(
    tmp_path: Path, version: str = "1", seed: int = 0, max_rows: int = 1024, *, start: bool = True, **options: Any
) -> InferenceCore:
    """A started (warmed, ready) core over the tiny model; `start=False` leaves it not ready.
    `options` go to `InferenceCore` (batching, cache, observer, faults)."""
    path = tmp_path / f"tiny-v{version}-s{seed}.onnx"
    sha = write_tiny_onnx(path, seed)
    core = InferenceCore(OnnxRunner(path, tiny_card(sha, version), intra_op_threads=1), max_rows, **options)
    if start:
        core.start()
    return core


def digits_rows(n: int, seed: int = 0) -> np.ndarray:
    """`n` real test digits (raw 0-16 pixels), float32 (n, 64)."""
    from models.data import load_split

    x = load_split().x_test
    return x[np.random.default_rng(seed).integers(0, len(x), n)]

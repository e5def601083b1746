"""What a BentoML user writes first: one `@bentoml.api(batchable=True)` around ONNX Runtime.

Default knobs everywhere (BentoML's batching limits, ONNX Runtime's session options, the
default HTTP stack). Served from this folder with `bentoml serve plain_bentoml:PlainDigits`
and `BENCH_ONNX_PATH` set; `POST /predict` takes `{"pixels": [[64 floats], ...]}`.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

ONNX_PATH_ENV = "BENCH_ONNX_PATH"  # the same name as bench.alternatives.ONNX_PATH_ENV


@bentoml.service(name="plain-digits")
class PlainDigits:
    def __init__(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(os.environ[ONNX_PATH_ENV], providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True)
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels.astype(np.float32)})[0]

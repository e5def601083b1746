"""MLServer's custom runtime for the benchmark: ONNX Runtime on the decoded V2 input.

Runs inside MLServer's own venv (`bench/peers.py`), so it imports nothing from this project.
`model-settings.json` (written by `bench.peers.write_mlserver_repo`) names it as
`mlserver_runtime.OrtDigits`, points `parameters.uri` at the ONNX file and turns MLServer's
adaptive batching on (`max_batch_size`, `max_batch_time`): MLServer then merges concurrent
requests along the first axis before `predict` and splits the answer after it. The input is
decoded with MLServer's own `NumpyCodec` (FP32 [N, 64]) and the output encoded with it
(`logits`, FP32 [N, 10]), as a user's runtime would.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OrtDigits(MLModel):
    """One ONNX Runtime session (default options, CPU), `session.run` per (merged) batch."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        logits = self._session.run([self._output], {self._input: x})[0]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(self._output, logits)],
        )

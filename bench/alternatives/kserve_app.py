"""KServe's ModelServer for the benchmark: a `kserve.Model` running ONNX Runtime.

Runs inside KServe's own venv (`bench/peers.py`), so it imports nothing from this project:
`python kserve_app.py --onnx PATH --http_port N --grpc_port M --workers 1`. The model is
named `digits`; KServe decodes V2 REST JSON (`POST /v2/models/digits/infer`) and V2 gRPC
(`inference.GRPCInferenceService/ModelInfer`) into an `InferRequest`, `predict` runs one
`session.run` on its first input (FP32 [N, 64]) and answers `logits` (FP32 [N, 10]) as a
numpy array, which KServe writes as a JSON list over REST and as raw bytes over gRPC.
With `--quiet-requests` no line is logged per request (uvicorn's access log and KServe's
`kserve.trace` timing lines are raised to WARNING, the gRPC interceptor's line is filtered
out; pass `--enable_latency_logging false` too). Every other ModelServer setting is KServe's default (its own argument parser reads
the rest of the command line).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

MODEL_NAME = "digits"


class OrtDigits(Model):
    """One ONNX Runtime session (default options, CPU), `session.run` per request."""

    def __init__(self, name: str, onnx_path: str) -> None:
        super().__init__(name)
        self.onnx_path = onnx_path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        logits = self.session.run([self.output_name], {self.input_name: x})[0]
        output = InferOutput(name=self.output_name, shape=list(logits.shape), datatype="FP32", data=logits)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--quiet-requests", action="store_true")
    args, _ = parser.parse_known_args()  # --http_port, --grpc_port, --workers: KServe's own parser
    server = ModelServer()  # configures KServe's logging
    if args.quiet_requests:  # no log line per request: uvicorn's access log, KServe's timing lines ...
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # ... and the gRPC interceptor's "grpc method: ..." line (the rest of KServe's INFO log stays)
        logging.getLogger("kserve").addFilter(lambda record: record.funcName != "intercept_service")
    server.start([OrtDigits(MODEL_NAME, args.onnx)])


if __name__ == "__main__":
    main()

"""The gRPC library's own ceiling: a `grpc.aio` server whose ModelInfer does no work at all.

Same server as the project's (`grpc.aio` in an asyncio loop, tritonclient's generated
servicer) with a handler that returns one answer computed at start-up: the model's logits for
the bench's digit, so the answer is exactly as large as a real one. Whatever calls/s it
reaches on this machine is what grpcio itself allows one Python process; the project's gRPC
row is read against it. Run as `python -m bench.alternatives.grpc_ceiling GRPC_PORT HTTP_PORT`
with `BENCH_ONNX_PATH` set; `GET /ready` on HTTP_PORT answers 200 once gRPC listens.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as pb2
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from bench.alternatives import ONNX_PATH_ENV


def fixed_answer(onnx_path: str) -> pb2.ModelInferResponse:
    """The model's answer to one all-zero digit, as the project would send it."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    logits = session.run(None, {spec.name: np.zeros((1, 64), np.float32)})[0]
    answer = pb2.ModelInferResponse(model_name="digits", model_version="1", id="")
    answer.outputs.add(name=session.get_outputs()[0].name, datatype="FP32", shape=list(logits.shape))
    answer.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    return answer


class EmptyServicer(pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, answer: pb2.ModelInferResponse) -> None:
        self._answer = answer

    async def ModelInfer(self, request: pb2.ModelInferRequest, context: object) -> pb2.ModelInferResponse:
        return self._answer


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def serve(grpc_port: int, http_port: int, answer: pb2.ModelInferResponse) -> None:
    import grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(EmptyServicer(answer), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    ready = ThreadingHTTPServer(("127.0.0.1", http_port), _Ready)
    threading.Thread(target=ready.serve_forever, daemon=True).start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), fixed_answer(os.environ[ONNX_PATH_ENV])))

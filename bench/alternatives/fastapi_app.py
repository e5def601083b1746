"""What a user writes by hand: FastAPI + uvicorn + ONNX Runtime, one `session.run` per request.

A V2-shaped JSON endpoint (`POST /v2/models/{model}/infer`) with pydantic request and
response models, ONNX Runtime with its default session options, no batching and no cache.
The handler is `async def` and calls `session.run` inline: with one worker process that is
the fastest shape (a sync `def` would hop through the thread pool and run several sessions
at once on two cores). Served as
`uvicorn --factory bench.alternatives.fastapi_app:create_app` with
`BENCH_ONNX_PATH` set.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench.alternatives import ONNX_PATH_ENV


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[list[float]]


class InferenceRequest(BaseModel):
    id: str | None = None
    inputs: list[RequestInput]


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[ResponseOutput]


def create_app(onnx_path: str | None = None) -> FastAPI:
    """The app around one ONNX file (default: the path in `BENCH_ONNX_PATH`)."""
    session = ort.InferenceSession(onnx_path or os.environ[ONNX_PATH_ENV], providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    app = FastAPI(title="digits (hand-written)")

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: InferenceRequest) -> InferenceResponse:
        tensor = request.inputs[0]
        try:
            array = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=f"bad input: {exc}") from None
        logits = session.run([output_name], {input_name: array})[0]
        return InferenceResponse(
            model_name=model_name,
            id=request.id,
            outputs=[
                ResponseOutput(
                    name=output_name, shape=list(logits.shape), datatype="FP32", data=logits.reshape(-1).tolist()
                )
            ],
        )

    return app

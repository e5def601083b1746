"""The servers a user would pick instead of this project, each around the same ONNX file.

`fastapi_app` is imported by uvicorn (`--factory`); `plain_bentoml` is served by
`bentoml serve plain_bentoml:PlainDigits` from this folder. Both read the model path from
`BENCH_ONNX_PATH`, so the benchmark can start them as plain processes.
"""

ONNX_PATH_ENV = "BENCH_ONNX_PATH"

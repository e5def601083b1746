"""The servers a user would pick instead of this project, each around the same ONNX file.

`fastapi_app` is imported by uvicorn (`--factory`); `plain_bentoml` is served by
`bentoml serve plain_bentoml:PlainDigits` from this folder. Both read the model path from
`BENCH_ONNX_PATH`, so the benchmark can start them as plain processes. The V2 peers
(`mlserver_runtime`, `kserve_app`, `litserve_app`) run in virtual environments of their own
(bench/peers.py), each from this folder.
"""

ONNX_PATH_ENV = "BENCH_ONNX_PATH"

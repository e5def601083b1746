"""The side-by-side serving benchmark (issue 7): `python -m bench [--quick] [--out DIR]`.

This project's Bento (V2 REST JSON, V2 REST binary, V2 gRPC) against a plain BentoML
service, a hand-written FastAPI server and `mlflow models serve`, all on the same ONNX
model (MLflow: the same registered model), one after another on this machine, plus the
in-process ONNX Runtime limit. Modules: `config` (knobs), `prepare` (models), `contenders`
(servers), `wrk` / `grpcload` (load), `measure`, `limit`, `results` (pure arithmetic),
`report` (JSON, Markdown, PNG), `runner` (the plan). Importing this package imports
nothing heavy: the runner activates the bench home before bentoml or mlflow load.
"""

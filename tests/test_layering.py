"""The layering the design promises: a transport-free core, a serving side without torch/mlflow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def imported_top_levels(*modules: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_inference_core_knows_no_transport():
    core_modules = ["service.core.inference", "service.core.runner", "service.core.model", "service.core.errors"]
    loaded = imported_top_levels(*core_modules)
    assert not loaded & {"bentoml", "starlette", "fastapi", "grpc", "torch", "mlflow"}


@pytest.mark.slow
def test_serving_process_never_imports_torch_or_mlflow():
    loaded = imported_top_levels("service.app")
    assert "bentoml" in loaded
    assert not loaded & {"torch", "mlflow", "sklearn"}

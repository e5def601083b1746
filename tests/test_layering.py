"""The layering the design promises, checked two ways.

Statically: import-linter's contracts in pyproject.toml ([tool.importlinter]: bench > deploy >
loadtest > models > service, bentoml only in service.app, a transport-free service.core, no
training stack in service). `lint-imports` sees every import statement, the ones inside
functions included; `make lint` runs it too.

At run time: what importing a module really loads, the imports of its dependencies included.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def importlinter_config() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_import_contracts_hold():
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: run `make setup` (installs import-linter)"
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"lint-imports exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


def test_every_service_module_but_the_app_is_held_to_no_bentoml():
    """The bentoml contract lists service's modules by name (service.app must stay out):
    a new module under service/ has to join the list, or it could import bentoml unchecked."""
    contract = next(c for c in importlinter_config()["contracts"] if c["id"] == "bentoml-only-in-app")
    children = {f"service.{m.name}" for m in pkgutil.iter_modules([str(REPO_ROOT / "service")])}
    assert set(contract["source_modules"]) == children - {"service.app"}


def imported_top_levels(*modules: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=REPO_ROOT
    )
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

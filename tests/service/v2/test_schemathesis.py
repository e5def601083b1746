"""Schemathesis drives a served Bento from the V2 REST API's OpenAPI description
(service/v2/openapi.yaml): thousands of generated requests, on both REST listeners (BentoML's
HTTP server, which mounts the V2 app, and the Bento's own V2 listener). Not one may be
answered 5xx, and the server's log must gain no traceback.

The path parameters are pinned to the served model's name and version (plus an unknown
version): random names would only ever reach the 404 of an unknown model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.pipeline import REST_LISTENERS

SPEC = Path(__file__).resolve().parents[3] / "service" / "v2" / "openapi.yaml"
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def pinned_spec(folder: Path, model: str, version: str) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    parameters = spec["components"]["parameters"]
    parameters["ModelName"]["schema"] = {"type": "string", "enum": [model]}
    parameters["ModelVersion"]["schema"] = {"type": "string", "enum": [version, "999"]}
    path = folder / "openapi.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("listener", REST_LISTENERS)
def test_no_generated_request_earns_a_server_error(serving, built_pipeline, canary_home, tmp_path, listener):
    log = canary_home.logs / "test-serve.log"
    before = log.stat().st_size
    spec = pinned_spec(tmp_path, canary_home.registered_model, str(built_pipeline.version))
    argv = [
        SCHEMATHESIS, "run", str(spec), "--url", serving.rest(listener), "--checks", "not_a_server_error",
        "--max-examples", "60", "--seed", "7", "--phases", "coverage,fuzzing", "--no-color",
        "--request-timeout", "20", "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its database stays there
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "generated" in done.stdout
    with log.open("rb") as handle:
        handle.seek(before)
        grown = handle.read().decode(errors="replace")
    assert "Traceback" not in grown, grown[grown.index("Traceback") - 500 :][:3000]

"""The serving image on the real engine: `canary containerize` builds it offline (no registry:
base from Debian packages, dependencies from the host's wheelhouse), slim and non-root; run
read-only with tmpfs for BentoML's home and /tmp, it passes its own HEALTHCHECK and answers
tritonclient over V2 REST and gRPC exactly as ONNX Runtime does in process."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from deploy.engine import Engine
from models.data import load_split
from tests.support.containers import inspect

pytestmark = [pytest.mark.slow, pytest.mark.engine]
PORTS = {"bentoml": "3000/tcp", "v2": "8000/tcp", "grpc": "50051/tcp"}


@dataclass(frozen=True)
class RunningImage:
    name: str
    addresses: dict[str, str]  # "bentoml", "v2", "grpc" -> 127.0.0.1:<published port>


def wait_healthy(engine: Engine, name: str, timeout_s: float = 240.0) -> dict:
    """The container's state once its own HEALTHCHECK passes; fails at once if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = inspect(engine, name)["State"]
        if state["Status"] in ("exited", "dead"):
            pytest.fail(f"the container exited ({state['ExitCode']}):\n{engine.run('logs', '--tail', '30', name)}")
        if state.get("Health", {}).get("Status") == "healthy":
            return state
        time.sleep(1.0)
    pytest.fail(f"the container was not healthy after {timeout_s:.0f}s:\n{engine.run('logs', '--tail', '30', name)}")


@pytest.fixture(scope="module")
def running(container_engine: Engine, served_image) -> Iterator[RunningImage]:
    """The image as an operator runs it: read-only root, tmpfs where BentoML writes, ports
    published on loopback only."""
    name = f"canary-test-{os.getpid()}-{secrets.token_hex(3)}"
    publish = [arg for port in PORTS.values() for arg in ("--publish", f"127.0.0.1::{port.split('/')[0]}")]
    container_engine.run(
        "run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/var/lib/bentoml:uid=1034,gid=1034",
        "--env", "CANARY_SERVICE_INTRA_OP_THREADS=1", *publish, served_image.image,
    )  # fmt: skip
    try:
        wait_healthy(container_engine, name)
        bound = inspect(container_engine, name)["NetworkSettings"]["Ports"]
        addresses = {key: f"127.0.0.1:{bound[port][0]['HostPort']}" for key, port in PORTS.items()}
        yield RunningImage(name, addresses)
    finally:
        container_engine.run("rm", "--force", name)


@pytest.fixture(scope="module")
def reference(served_image):
    """In-process ONNX Runtime on the very model the image carries."""
    import bentoml

    split = load_split()
    rows = split.x_test[:200]
    stored = bentoml.models.get(f"digits:v{served_image.model_version}")
    session = ort.InferenceSession(stored.path_of("model.onnx"), providers=["CPUExecutionProvider"])
    return rows, session.run(["logits"], {"input": rows})[0]


def test_the_image_is_slim_non_root_with_three_ports_a_healthcheck_and_no_compiler(container_engine, served_image):
    first = served_image.output.splitlines()[0]
    match = re.match(rf"^{re.escape(served_image.image)}: (\d+) MB \(within the 400 MB target\), base \S+$", first)
    assert match, served_image.output
    image = inspect(container_engine, served_image.image)
    assert image["Size"] < 400e6 and abs(image["Size"] / 1e6 - int(match.group(1))) < 1
    config = image["Config"]
    assert config["User"] == "1034:1034"
    assert set(config["ExposedPorts"]) >= set(PORTS.values())
    assert "http://127.0.0.1:3000/v2/health/ready" in " ".join(config["Healthcheck"]["Test"])
    probe = "for tool in gcc cc g++ clang make pip pip3 python3; do command -v $tool; done; true"
    found = container_engine.run("run", "--rm", "--entrypoint", "sh", served_image.image, "-c", probe).split()
    assert len(found) == 1 and found[0].endswith("/python3"), found  # Python, but no compiler and no pip


def test_tritonclient_http_and_grpc_get_what_onnx_runtime_computes_in_process(running, reference, served_image):
    rows, logits = reference
    for listener in ("v2", "bentoml"):
        client = triton_http.InferenceServerClient(running.addresses[listener])
        assert client.is_server_ready() and client.is_model_ready("digits")
        request = triton_http.InferInput("input", list(rows.shape), "FP32")
        request.set_data_from_numpy(rows, binary_data=True)
        result = client.infer("digits", [request], outputs=[triton_http.InferRequestedOutput("logits")])
        np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
        client.close()
    client = triton_grpc.InferenceServerClient(running.addresses["grpc"])
    assert client.is_server_ready() and client.is_model_ready("digits")
    request = triton_grpc.InferInput("input", list(rows.shape), "FP32")
    request.set_data_from_numpy(rows)
    result = client.infer("digits", [request])
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    assert result.get_response().model_version == served_image.model_version
    client.close()


def test_the_container_runs_as_uid_1034_on_a_read_only_root_filesystem(container_engine, running):
    assert container_engine.run("exec", running.name, "id", "-u").strip() == "1034"
    state = inspect(container_engine, running.name)
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert state["State"]["Health"]["Status"] == "healthy"  # the image's own HEALTHCHECK
    for path in ("/home/bentoml/bento/written", "/opt/venv/written", "/written"):
        refused = container_engine.run("exec", running.name, "sh", "-c", f"touch {path} 2>&1 || true")
        assert "Read-only file system" in refused, path

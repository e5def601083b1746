"""`canary --target compose` on the real engine with real containers, through the real CLI and
the compose this machine has (Debian's docker-compose 1.29 here): up -> deploy -> weight 30
(the split measured over 1,000 requests) -> a Locust load with zero failures across weight
changes, shadowing and a rollback -> a rollout whose candidate fails its gate is rolled back
-> down leaves no container and no network. All traffic goes to nginx's ports published on
loopback; the slot containers are reached only through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from deploy.engine import Engine
from deploy.process import free_port
from models.data import load_split
from tests.support.containers import BuiltImage, canary, containerize

pytestmark = [pytest.mark.slow, pytest.mark.engine]
ROUTER_LOAD = Path(__file__).resolve().parents[1] / "support" / "router_load.py"
SPLIT_REQUESTS = 1000


@dataclass(frozen=True)
class ComposeRun:
    env: dict[str, str]
    project: str
    rest: int
    grpc: int
    stable: BuiltImage
    candidate: BuiltImage
    tmp: Path

    def canary(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return canary("--target", "compose", *args, timeout=900, env={**self.env, **extra})

    def ok(self, *args: str, **extra: str) -> str:
        done = self.canary(*args, **extra)
        assert done.returncode == 0, f"canary --target compose {' '.join(args)}:\n{done.stderr[-2000:]}"
        return done.stdout

    def status(self) -> dict:
        return json.loads(self.ok("status", "--json"))


@pytest.fixture(scope="module")
def compose(
    container_engine: Engine, canary_home, built_pipeline, served_image, second_version, tmp_path_factory
) -> Iterator[ComposeRun]:
    from models.bento import find_bento

    built = canary("base-image")  # Redis and nginx come from its services image
    assert built.returncode == 0, built.stderr[-2000:]
    # `up` serves the champion: the session's image unless an earlier test promoted another
    champion = find_bento(canary_home, "@champion")[1]
    stable = served_image if champion == served_image.model_version else containerize("@champion")
    # the candidate: the session's second version, built and containerized as a user would
    build = canary("build", "--version", str(second_version.version))
    assert build.returncode == 0, build.stderr[-2000:]
    candidate = containerize(str(second_version.version))
    tmp = tmp_path_factory.mktemp("compose-engine")
    project = f"canary-test-{os.getpid()}"
    rest, grpc = free_port(), free_port()
    env = {
        "CANARY_COMPOSE_NAME": f"compose-{project}", "CANARY_COMPOSE_PROJECT": project,
        "CANARY_COMPOSE_RENDERED_DIR": str(tmp / "rendered"), "CANARY_COMPOSE_NGINX_REST_PORT": str(rest),
        "CANARY_COMPOSE_NGINX_GRPC_PORT": str(grpc), "CANARY_COMPOSE_NGINX_ADMIN_PORT": str(free_port()),
        "CANARY_COMPOSE_OBSERVABILITY": "false",
    }  # fmt: skip
    run = ComposeRun(env, project, rest, grpc, stable, candidate, tmp)
    yield run
    run.canary("down")
    for leftover in left_behind(container_engine, project):  # only if a test failed before its `down`
        subprocess.run([container_engine.client, "rm", "--force", leftover], capture_output=True, check=False)
        subprocess.run([container_engine.client, "network", "rm", leftover], capture_output=True, check=False)


def left_behind(engine: Engine, project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    containers = engine.run("ps", "--all", "--quiet", "--filter", label).split()
    networks = engine.run("network", "ls", "--quiet", "--filter", label).split()
    return containers + networks


def test_a_release_on_real_containers_splits_as_weighted_and_serves_a_load_without_failures(compose):
    up = compose.ok("up")
    assert f"stable blue={compose.stable.bento}" in up
    blue = compose.status()["slots"]["blue"]
    assert blue["alive"] and blue["healthy"] and blue["model_version"] == compose.stable.model_version

    compose.ok("deploy", compose.candidate.model_version)
    compose.ok("weight", "30")
    status = compose.status()
    assert status["slots"]["green"]["healthy"] and status["nginx"]["router"]["weight"] == 30

    rows = load_split().x_train[:SPLIT_REQUESTS]
    assert len(np.unique(rows, axis=0)) == SPLIT_REQUESTS  # distinct inputs
    answered: Counter[str] = Counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{compose.rest}", timeout=30, trust_env=False) as client:
        for row in rows:
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}],
                    "parameters": {"cache": False}}  # fmt: skip
            answer = client.post("/v2/models/digits/infer", json=body)
            assert answer.status_code == 200, answer.text
            answered[answer.json()["model_version"]] += 1
    assert set(answered) == {compose.stable.model_version, compose.candidate.model_version}
    share = 100 * answered[compose.candidate.model_version] / SPLIT_REQUESTS
    assert 27 <= share <= 33, answered

    grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{compose.grpc}")
    request = triton_grpc.InferInput("input", [4, 64], "FP32")
    request.set_data_from_numpy(rows[:4])
    response = grpc.infer("digits", [request]).get_response()  # either slot's model (their outputs differ)
    assert response.model_version in answered and response.outputs[0].shape[0] == 4
    grpc.close()

    load = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(ROUTER_LOAD), "--headless", "-u", "8", "-r", "8", "-t", "600s",
         "--host", f"http://127.0.0.1:{compose.rest}", "--json", "--loglevel", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for command in (("weight", "50"), ("shadow", "on"), ("weight", "10"), ("shadow", "off"),
                        ("rollback", "--reason", "drill")):  # fmt: skip
            compose.ok(*command)
            assert load.poll() is None, load.stderr.read() if load.stderr else ""
    finally:
        load.send_signal(signal.SIGTERM)
        out, err = load.communicate(timeout=120)
    (stats,) = [entry for entry in json.loads(out[out.index("[") :]) if entry["name"] == "infer"]
    assert stats["num_requests"] > 100, err[-2000:]
    assert stats["num_failures"] == 0, err[-2000:]
    assert compose.status()["weight"] == 0


def test_a_rollout_whose_candidate_fails_its_gate_is_rolled_back(compose):
    # the candidate answers its smoke inferences (the deploy's, the first step's check), then
    # every fifth request fails: the gate at 10% must see it and roll back
    faults = compose.tmp / "faulty-green.yaml"
    faults.write_text(
        "services:\n  green:\n    environment:\n"
        '      CANARY_SERVICE_FAULT_ERROR_RATIO: "0.2"\n      CANARY_SERVICE_FAULT_AFTER_REQUESTS: "2"\n'
    )
    compose.ok("deploy", compose.candidate.model_version, CANARY_COMPOSE_EXTRA_FILES=json.dumps([str(faults)]))
    rollout = compose.canary("rollout", "--steps", "10,100", "--step-duration", "10s", "--users", "16")
    assert rollout.returncode == 1, rollout.stderr[-2000:]
    status = compose.status()
    assert status["weight"] == 0 and status["candidate"] == "green"
    assert status["last_gate"]["verdict"] == "fail"
    last = json.loads(compose.ok("history", "--json"))[-1]
    assert last["action"] == "rollback" and "gate fail at 10%" in last["reason"]


def test_down_leaves_no_container_and_no_network(compose, container_engine):
    assert left_behind(container_engine, compose.project)  # the stack was up
    compose.ok("down")
    assert left_behind(container_engine, compose.project) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{compose.rest}/v2/health/ready", timeout=2, trust_env=False)

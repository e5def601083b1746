"""The local release stack for real: nginx + two Bento slots + Redis, driven like `canary`.

Zero lost requests under Locust load while weights move, the split matching the weight,
header forcing, stickiness, shadow traffic, a crashed candidate, state surviving restarts.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from deploy.process import free_port, kill_tree
from deploy.release import plan_deploy, plan_rollback, plan_shadow, plan_switch, plan_weight
from deploy.stack import LocalStack, StackSettings
from models.errors import CanaryError

pytestmark = pytest.mark.slow
LOCUSTFILE = Path(__file__).parent / "support" / "zero_loss_locustfile.py"
ROW = np.full((1, 64), 3.0, dtype=np.float32)
BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW.ravel().tolist()}]}


@pytest.fixture(scope="module")
def stack_settings() -> StackSettings:
    names = ["nginx_rest_port", "nginx_grpc_port", "nginx_admin_port", "blue_rest_port", "blue_grpc_port",
             "green_rest_port", "green_grpc_port", "blue_v2_port", "green_v2_port", "redis_port"]  # fmt: skip
    return StackSettings(name="stack-test", **{name: free_port() for name in names})


@pytest.fixture(scope="module")
def candidate_bento(canary_home, second_version) -> tuple[str, str]:
    from models.bento import build_bento

    built = build_bento(canary_home, version=second_version.version)
    return built.tag, str(second_version.version)


@pytest.fixture(scope="module")
def stack(canary_home, stack_settings, built_pipeline):
    stack = LocalStack(canary_home, stack_settings)
    stack.up((built_pipeline.bento_tag, str(built_pipeline.version)))
    yield stack
    stack.down()


def run(stack: LocalStack, plan):
    return stack.execute(plan)


def rest(stack: LocalStack, headers: dict | None = None) -> httpx.Response:
    url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits/infer"
    return httpx.post(url, json=BODY, headers=headers or {}, timeout=30)


def test_deploy_starts_the_candidate_at_zero_percent(stack, candidate_bento):
    after = run(stack, plan_deploy(stack.store.load(), *candidate_bento))
    assert after.candidate == "green" and after.weight == 0
    slots = {rest(stack).headers["x-canary-slot"] for _ in range(30)}
    assert slots == {"blue"}
    status = stack.status()
    assert status["slots"]["green"]["healthy"] and status["slots"]["green"]["bento"] == candidate_bento[0]


def test_a_candidate_that_never_gets_ready_gets_no_traffic(stack, candidate_bento, monkeypatch):
    before = stack.store.load()
    monkeypatch.setenv("CANARY_SERVICE_MAX_QUEUE_ROWS", "1")  # an invalid setting: the slot cannot start
    with pytest.raises(CanaryError, match="exited|not ready"):
        stack.execute(plan_deploy(before, *candidate_bento))
    monkeypatch.delenv("CANARY_SERVICE_MAX_QUEUE_ROWS")
    assert stack.store.load() == before
    assert {rest(stack).headers["x-canary-slot"] for _ in range(20)} == {"blue"}
    run(stack, plan_deploy(stack.store.load(), *candidate_bento))  # a good deploy again, for what follows
    assert stack.status()["slots"]["green"]["healthy"]


def test_a_port_already_taken_is_one_clear_error_before_anything_starts(canary_home, built_pipeline):
    import socket

    names = ["nginx_rest_port", "nginx_grpc_port", "nginx_admin_port", "blue_rest_port", "blue_grpc_port",
             "green_rest_port", "green_grpc_port", "blue_v2_port", "green_v2_port", "redis_port"]  # fmt: skip
    settings = StackSettings(name="stack-port-test", **{name: free_port() for name in names})
    other = LocalStack(canary_home, settings)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.nginx_grpc_port))
        squatter.listen()
        with pytest.raises(CanaryError, match=f"port {settings.nginx_grpc_port} \\(nginx gRPC\\) is already taken"):
            other.up((built_pipeline.bento_tag, str(built_pipeline.version)))
    assert not other.process("redis").alive and not other.process("slot-blue").alive


def test_header_forcing_and_user_stickiness(stack, candidate_bento):
    run(stack, plan_weight(stack.store.load(), 50))
    forced = rest(stack, {"X-Canary": "always"})
    assert forced.headers["x-canary-slot"] == "green" and forced.headers["x-model-version"] == candidate_bento[1]
    assert rest(stack, {"X-Canary": "never"}).headers["x-canary-slot"] == "blue"
    for user in ("ada", "grace", "linus"):
        seen = {rest(stack, {"X-User-Id": user}).headers["x-canary-slot"] for _ in range(15)}
        assert len(seen) == 1, f"user {user} moved between slots"
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{stack.settings.nginx_grpc_port}")
    request = triton_grpc.InferInput("input", [1, 64], "FP32")
    request.set_data_from_numpy(ROW)
    answer = client.infer("digits", [request], headers={"x-canary": "always"})
    assert answer.get_response().model_version == candidate_bento[1]
    client.close()


def test_weight_changes_switch_and_rollback_lose_no_request(stack, candidate_bento, tmp_path):
    """Locust POSTs (no retries) and a gRPC loop run while the weight moves 20 times, the
    stack switches and rolls back; the split at weight 30 is measured over >= 2000 requests."""
    run(stack, plan_weight(stack.store.load(), 30))
    token = stack.token_file.read_text().strip()

    def served() -> dict[str, int]:
        return {name: info["requests"] for name, info in stack.nginx().status(token)["slots"].items()}

    host = f"http://127.0.0.1:{stack.settings.nginx_rest_port}"
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "8", "-r", "8", "-t", "120s",
         "--host", host, "--csv", str(tmp_path / "run"), "--only-summary", "--stop-timeout", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    grpc_failures: list[str] = []
    grpc_done = [0]
    stop = threading.Event()

    def grpc_loop() -> None:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{stack.settings.nginx_grpc_port}")
        request = triton_grpc.InferInput("input", [1, 64], "FP32")
        request.set_data_from_numpy(ROW)
        while not stop.is_set():
            try:
                client.infer("digits", [request], client_timeout=30)
                grpc_done[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                grpc_failures.append(str(exc))
        client.close()

    grpc_thread = threading.Thread(target=grpc_loop)
    grpc_thread.start()

    try:
        # The split at weight 30, from nginx's per-slot counters, over >= 2000 requests.
        start = served()
        deadline = time.monotonic() + 120
        while sum(served().values()) - sum(start.values()) < 2200 and time.monotonic() < deadline:
            time.sleep(0.5)
        end = served()
        blue, green = end["blue"] - start["blue"], end["green"] - start["green"]
        for i in range(20):
            run(stack, plan_weight(stack.store.load(), (i * 37) % 101))
            time.sleep(0.15)
        run(stack, plan_switch(stack.store.load()))
        time.sleep(0.5)
        run(stack, plan_switch(stack.store.load()))  # back: blue stable again
        run(stack, plan_weight(stack.store.load(), 40))
        time.sleep(0.5)
        run(stack, plan_rollback(stack.store.load(), reason="zero-loss test"))
        time.sleep(1)
    finally:
        stop.set()
        grpc_thread.join(timeout=60)
        # SIGTERM, not SIGINT: Locust handles SIGTERM in a gevent signal handler (stats written,
        # then exit); SIGINT becomes a KeyboardInterrupt in whichever greenlet runs, and with a
        # fast server that is often a user greenlet, which swallows it (seen: Locust ran on).
        locust.send_signal(signal.SIGTERM)
        _, stderr = locust.communicate(timeout=60)
    with open(tmp_path / "run_stats.csv") as handle:
        total_row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    requests, failures = int(total_row["Request Count"]), int(total_row["Failure Count"])
    assert requests > 2000, stderr[-2000:]
    assert failures == 0, (tmp_path / "run_failures.csv").read_text()
    assert grpc_failures == [] and grpc_done[0] > 50
    assert blue + green >= 2000, (blue, green)
    assert abs(green / (blue + green) - 0.30) <= 0.03, (blue, green)
    assert stack.store.load().weight == 0


def test_shadow_copies_reach_the_candidate_and_clients_get_stable(stack):
    run(stack, plan_shadow(stack.store.load(), True))
    token = stack.token_file.read_text().strip()
    before = stack.nginx().status(token)["slots"]["green"]["shadow_requests"]
    answers = [rest(stack, {"X-Canary": "never"}) for _ in range(20)]
    assert {a.headers["x-canary-slot"] for a in answers} == {"blue"} and all(a.status_code == 200 for a in answers)
    deadline = time.monotonic() + 10
    while (
        stack.nginx().status(token)["slots"]["green"]["shadow_requests"] < before + 20 and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert stack.nginx().status(token)["slots"]["green"]["shadow_requests"] >= before + 20
    run(stack, plan_shadow(stack.store.load(), False))


def test_state_survives_a_restart_of_the_stack(stack, candidate_bento):
    run(stack, plan_weight(stack.store.load(), 25))
    before = stack.store.load()
    stack.down()
    assert not stack.nginx().running() and not stack.process("slot-green").alive
    stack.up(None)
    after = stack.store.load()
    assert (after.stable, after.candidate, after.weight) == (before.stable, before.candidate, before.weight)
    token = stack.token_file.read_text().strip()
    assert stack.nginx().status(token)["weight"] == 25
    assert rest(stack, {"X-Canary": "always"}).headers["x-model-version"] == candidate_bento[1]


def test_bad_release_requests_leave_traffic_unchanged(stack, stack_settings, canary_home):
    before = stack.store.load()
    with pytest.raises(CanaryError, match="between 0 and 100"):
        plan_weight(before, 101)
    env = {**os.environ, **{f"CANARY_STACK_{k.upper()}": str(v) for k, v in stack_settings.model_dump().items()}}
    canary = str(Path(sys.executable).parent / "canary")
    for args, fragment in ((["weight", "abc"], "percent"), (["deploy", "999"], "does not exist"),
                           (["weight", "150"], "between 0 and 100"), (["shadow", "maybe"], "on or off")):  # fmt: skip
        result = subprocess.run([canary, *args], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert fragment in result.stderr.strip().splitlines()[-1]
    assert stack.store.load() == before


def test_a_killed_candidate_costs_no_request(stack):
    run(stack, plan_weight(stack.store.load(), 50))
    info = stack.process("slot-green")
    kill_tree(info.pid)  # a crash: the server and its workers die at once
    answers = [rest(stack) for _ in range(60)]
    assert [a.status_code for a in answers] == [200] * 60
    assert {a.headers["x-canary-slot"] for a in answers} == {"blue"}
    status = stack.status()
    assert not status["slots"]["green"]["alive"] and not status["slots"]["green"]["healthy"]

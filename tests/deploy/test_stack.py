"""The local release stack for real: nginx + two Bento slots + Redis, driven like `canary`.

Zero lost requests under Locust load while weights move, the split matching the weight,
header forcing, stickiness, shadow traffic, a crashed candidate, state surviving restarts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc

from deploy.chaos import read_locust_json
from deploy.process import free_port, kill_tree
from deploy.release import plan_deploy, plan_rollback, plan_shadow, plan_switch, plan_weight
from deploy.stack import LocalStack, StackSettings
from loadtest.load_options import PROTOCOLS
from loadtest.targets import request_name
from models.errors import CanaryError
from tests.support.listeners import listen_addresses
from tests.support.locust_runs import canary_loadtests, locust_cli

pytestmark = pytest.mark.slow
LOCUSTFILE = Path(__file__).parents[2] / "loadtest" / "locustfile.py"
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


def test_slots_use_the_stacks_redis_with_its_password_and_signing_key(stack):
    """A repeated request is a verified cache hit on the stable slot, with no Redis error."""
    from tests.support.metrics import scrape, total

    stable = stack.store.load().stable
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [7.0] * 64}]}
    before = scrape(stack.slot_url(stable))
    for _ in range(2):
        httpx.post(f"{stack.slot_v2_url(stable)}/v2/models/digits/infer", json=body, timeout=30).raise_for_status()
    after = scrape(stack.slot_url(stable))
    events = "canary_cache_events_total"
    grown = {
        kind: total(after, events, kind=kind) - total(before, events, kind=kind) for kind in ("hit", "miss", "error")
    }
    assert grown == {"hit": 1, "miss": 1, "error": 0}
    assert total(after, "canary_cache_rejected_total") == 0


def test_answers_through_nginx_are_logged_under_their_request_id_labelled_and_exported(
    stack, stack_settings, built_pipeline, tmp_path
):
    """REST and gRPC through nginx: the id is echoed (header, trailers, V2 id) and keys the
    stack's log; labels posted through nginx show in `canary status`; `canary predictions`
    exports the window with its labels."""
    import grpc
    import pyarrow.parquet as pq
    from tritonclient.grpc import service_pb2 as pb2
    from tritonclient.grpc import service_pb2_grpc as pb2_grpc

    version, s = str(built_pipeline.version), stack_settings
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    x = np.random.default_rng(3).integers(0, 17, (6, 64)).astype(np.float32)
    ids, predicted = [], []
    for i, row in enumerate(x[:4]):
        headers = {"X-Request-Id": f"stack-rest-{i}"} if i % 2 else {}
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
        answer = httpx.post(f"http://127.0.0.1:{s.nginx_rest_port}/v2/models/digits/infer", json=body,
                            headers=headers, timeout=30)  # fmt: skip
        assert answer.headers["x-request-id"] == answer.json()["id"] == headers.get("X-Request-Id", answer.json()["id"])
        ids.append(answer.json()["id"])
        predicted.append(int(np.argmax(answer.json()["outputs"][0]["data"])))
    with grpc.insecure_channel(f"127.0.0.1:{s.nginx_grpc_port}") as channel:
        for i, row in enumerate(x[4:]):
            request = pb2.ModelInferRequest(model_name="digits")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(row.astype("<f4").tobytes())
            metadata = (("x-request-id", f"stack-grpc-{i}"),) if i else ()
            response, call = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                request, metadata=metadata, timeout=30
            )
            trailer = dict(call.trailing_metadata())["x-request-id"]
            assert response.id == trailer and (not i or trailer == "stack-grpc-1")
            ids.append(trailer)
            predicted.append(int(np.frombuffer(response.raw_output_contents[0], "<f4").argmax()))
    store = stack.prediction_store()
    deadline = time.monotonic() + 30
    while len(store.lookup("digits", ids)) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {rid: p.classes for rid, p in store.lookup("digits", ids).items()} == {
        rid: (c,) for rid, c in zip(ids, predicted, strict=True)}  # fmt: skip

    before = stack.online_accuracy().get(version, {"labels": 0})["labels"]
    labels = [
        {"id": rid, "label": c if i else (c + 1) % 10} for i, (rid, c) in enumerate(zip(ids, predicted, strict=True))
    ]
    posted = httpx.post(f"http://127.0.0.1:{s.nginx_rest_port}/v2/models/digits/feedback", json=labels, timeout=30)
    assert posted.status_code == 200 and posted.json() == {"accepted": 6, "duplicates": 0}
    status = canary_cli(stack_settings, "status")
    accuracy_line = next(line for line in status.stdout.splitlines() if line.startswith("online accuracy"))
    after = stack.online_accuracy()[version]
    assert after["labels"] == before + 6 and f"version {version} " in accuracy_line
    assert f"of {after['labels']} labels" in accuracy_line, accuracy_line

    out = tmp_path / "window.parquet"
    exported = canary_cli(stack_settings, "predictions", "--since", since, "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    table = {row["request_id"]: row for row in pq.read_table(out).to_pylist()}
    assert set(ids) <= set(table) and all(table[rid]["model_version"] == version for rid in ids)
    assert [table[rid]["labels"] for rid in ids] == [[label["label"]] for label in labels]
    assert {table[rid]["protocol"] for rid in ids} == {"rest", "grpc"}


def test_nothing_of_the_stack_listens_on_every_interface(stack, stack_settings):
    """`ss -ltn` after `canary up`: nginx (public listeners included), the serving slot and
    Redis listen on the stack's host only (127.0.0.1 by default)."""
    s, stable = stack_settings, stack.store.load().stable
    ports = [s.nginx_rest_port, s.nginx_grpc_port, s.nginx_admin_port, s.redis_port, *s.slot_ports(stable)]
    assert {port: listen_addresses(port) for port in ports} == dict.fromkeys(ports, {"127.0.0.1"})


@pytest.mark.parametrize(("public_host", "listen"), [("", "127.0.0.1"), ("0.0.0.0", "0.0.0.0"), ("::", "[::]")])
def test_nginx_public_listeners_bind_the_stacks_host_unless_told(tmp_path, monkeypatch, public_host, listen):
    """The config `canary up` applies: public listeners on CANARY_STACK_HOST, or on
    CANARY_STACK_PUBLIC_HOST when set; the admin listener stays on loopback."""
    from deploy.nginx import NginxController
    from deploy.state import ReleaseState
    from models.home import CanaryHome

    applied: list[str] = []
    monkeypatch.setattr(NginxController, "apply", lambda self, text, generation: applied.append(text))
    rest, grpc, admin = free_port(), free_port(), free_port()
    settings = StackSettings(name="listen-test", nginx_rest_port=rest, nginx_grpc_port=grpc, nginx_admin_port=admin,
                             public_host=public_host)  # fmt: skip
    LocalStack(CanaryHome(home=tmp_path), settings).apply_nginx_config(ReleaseState())
    (text,) = applied
    assert f"listen {listen}:{rest};" in text and f"listen {listen}:{grpc} http2;" in text
    assert f"listen 127.0.0.1:{admin};" in text


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


def forced(stack: LocalStack, mode: str) -> dict[str, str]:
    return {"X-Canary": mode, "X-Canary-Force-Token": stack.force_token()}


def grpc_answer(stack: LocalStack, metadata: dict[str, str]) -> str:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{stack.settings.nginx_grpc_port}")
    request = triton_grpc.InferInput("input", [1, 64], "FP32")
    request.set_data_from_numpy(ROW)
    try:
        return client.infer("digits", [request], headers=metadata).get_response().model_version
    finally:
        client.close()


def test_forcing_needs_the_force_token_and_stickiness_is_for_everyone(stack, candidate_bento):
    stable_version = stack.store.load().slots["blue"].model_version
    # at weight 0 an anonymous X-Canary: always never reaches the candidate; with the token it always does
    assert {rest(stack, {"X-Canary": "always"}).headers["x-canary-slot"] for _ in range(20)} == {"blue"}
    assert grpc_answer(stack, {"x-canary": "always"}) == stable_version
    answers = [rest(stack, forced(stack, "always")) for _ in range(20)]
    assert {(a.headers["x-canary-slot"], a.headers["x-model-version"]) for a in answers} == {
        ("green", candidate_bento[1])
    }
    token = {"x-canary-force-token": stack.force_token()}
    assert grpc_answer(stack, {"x-canary": "always", **token}) == candidate_bento[1]
    assert stat.S_IMODE(stack.force_token_file.stat().st_mode) == 0o600
    run(stack, plan_weight(stack.store.load(), 50))
    assert rest(stack, forced(stack, "never")).headers["x-canary-slot"] == "blue"
    for user in ("ada", "grace", "linus"):
        seen = {rest(stack, {"X-User-Id": user}).headers["x-canary-slot"] for _ in range(15)}
        assert len(seen) == 1, f"user {user} moved between slots"


def test_overloaded_stable_at_weight_0_never_spills_onto_the_candidate(stack, candidate_bento):
    """24 parallel 1024-row requests overflow stable's queue: the overflow is answered 503 by
    stable itself (Retry-After), never by the candidate, and stable is not marked down."""
    from concurrent.futures import ThreadPoolExecutor

    run(stack, plan_weight(stack.store.load(), 0))
    rows = np.random.default_rng(0).uniform(0, 16, (1024, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": [1024, 64], "datatype": "FP32", "data": rows.ravel().tolist()}],
            "parameters": {"cache": False}}  # fmt: skip
    url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits/infer"
    token = stack.token_file.read_text().strip()
    green_before = stack.nginx().status(token)["slots"]["green"]["requests"]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: httpx.post(url, json=body, timeout=60), range(24)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 503} and 503 in codes, codes
    assert {a.headers["x-canary-slot"] for a in answers} == {"blue"}
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
    router = stack.nginx().status(token)["slots"]
    assert router["green"]["requests"] == green_before and not router["blue"]["down"]


class Load:
    """Locust (distinct digits, cache off, no retries) plus a gRPC loop through nginx, with
    nginx's per-slot counters to say where traffic went."""

    def __init__(self, stack: LocalStack, out: Path) -> None:
        self.stack, self.out = stack, out
        self.token = stack.token_file.read_text().strip()
        host = f"http://127.0.0.1:{stack.settings.nginx_rest_port}"
        self.locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "8", "-r", "8", "-t", "300s",
             "--host", host, "--csv", str(out / "run"), "--json-file", str(out / "final"), "--only-summary",
             "--stop-timeout", "5", "V2RestJsonUser"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.grpc_failures: list[str] = []
        self.grpc_failed_at: list[float] = []  # time.monotonic() of each failure
        self.grpc_done = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._grpc_loop)
        self.thread.start()

    def _grpc_loop(self) -> None:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{self.stack.settings.nginx_grpc_port}")
        rng = np.random.default_rng(1)
        while not self.stop_event.is_set():
            request = triton_grpc.InferInput("input", [1, 64], "FP32")
            request.set_data_from_numpy(ROW + rng.uniform(0, 0.5, (1, 64)).astype(np.float32))
            try:
                client.infer("digits", [request], client_timeout=30, parameters={"cache": False})
                self.grpc_done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                self.grpc_failed_at.append(time.monotonic())
                self.grpc_failures.append(str(exc))
        client.close()

    def served(self) -> dict[str, int]:
        return {name: info["requests"] for name, info in self.stack.nginx().status(self.token)["slots"].items()}

    def shares(self, at_least: int = 300, settle_s: float = 0.3) -> dict[str, int]:
        """Requests each slot answered over the next `at_least` requests (after in-flight
        requests of the previous routing drained)."""
        time.sleep(settle_s)
        start = self.served()
        deadline = time.monotonic() + 60
        while sum(self.served().values()) - sum(start.values()) < at_least:
            assert time.monotonic() < deadline, "the load stopped"
            time.sleep(0.05)
        end = self.served()
        return {name: end[name] - start[name] for name in end}

    def stop(self) -> tuple[int, int, str]:
        """(requests, failures, failures CSV) of the Locust run."""
        self.stop_event.set()
        self.thread.join(timeout=60)
        # SIGTERM, not SIGINT: Locust handles SIGTERM in a gevent signal handler (stats written,
        # then exit); SIGINT becomes a KeyboardInterrupt in whichever greenlet runs, and with a
        # fast server that is often a user greenlet, which swallows it (seen: Locust ran on).
        self.locust.send_signal(signal.SIGTERM)
        _, stderr = self.locust.communicate(timeout=60)
        # the final counts: Locust rewrites its CSVs once a second and not again on SIGTERM
        stats = read_locust_json(self.out / "final.json")
        failures = (self.out / "run_failures.csv").read_text()
        return stats.requests, stats.failures, failures + stderr[-2000:]


def model_rows(stack: LocalStack, slot: str) -> float:
    """Rows ONNX Runtime ran in `slot` (its batch histogram's sum): cache hits add nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{stack.slot_url(slot)}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "canary_batch_rows_sum")  # fmt: skip


def assert_split(shares: dict[str, int], green_percent: int, tolerance: int = 8) -> None:
    total = shares["blue"] + shares["green"]
    if green_percent in (0, 100):  # exact: not one request on the wrong slot
        assert shares["green" if green_percent == 0 else "blue"] == 0, shares
    else:
        assert abs(100 * shares["green"] / total - green_percent) <= tolerance, (green_percent, shares)


def test_weight_changes_switch_and_rollback_lose_no_request_and_route_as_told(stack, candidate_bento, tmp_path):
    """Locust POSTs (no retries, distinct digits, cache off) and a gRPC loop run while the
    weight moves 20 times, the stack switches, switches back and rolls back; after every
    change nginx's counters show traffic where the routing says, and no request fails."""
    run(stack, plan_weight(stack.store.load(), 30))
    rows_before = {slot: model_rows(stack, slot) for slot in ("blue", "green")}
    load = Load(stack, tmp_path)
    answered = 0
    try:
        split = load.shares(at_least=2000)
        answered += sum(split.values())
        assert_split(split, 30, tolerance=3)
        for i in range(20):
            weight = (i * 37) % 101
            run(stack, plan_weight(stack.store.load(), weight))
            split = load.shares()
            answered += sum(split.values())
            assert_split(split, weight)
        run(stack, plan_switch(stack.store.load()))  # green stable at 100%
        split = load.shares()
        assert split["blue"] == 0 and split["green"] > 0, split
        run(stack, plan_switch(stack.store.load()))  # back: blue stable again
        split = load.shares()
        assert split["green"] == 0 and split["blue"] > 0, split
        run(stack, plan_weight(stack.store.load(), 40))
        assert_split(load.shares(), 40)
        run(stack, plan_rollback(stack.store.load(), reason="zero-loss test"))
        split = load.shares()
        assert split["green"] == 0, split
    finally:
        requests, failures, details = load.stop()
    assert requests > 2000, details
    assert failures == 0, details
    assert load.grpc_failures == [] and load.grpc_done > 50
    assert stack.store.load().weight == 0
    # the model ran for every request: no answer came from the cache
    ran = sum(model_rows(stack, slot) - rows_before[slot] for slot in ("blue", "green"))
    assert ran >= answered, (ran, answered)


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


def replay_through_nginx(stack: LocalStack, x: np.ndarray) -> str:
    """Each digit as its own V2 REST request through nginx, no label, no forcing; returns the
    window's start (ISO, UTC) once the last copy is in the log."""
    since = datetime.now(UTC).isoformat()  # to the microsecond: earlier tests' copies stay out
    url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits/infer"
    ids = []
    with httpx.Client(timeout=30) as client:
        for row in x:
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
            answer = client.post(url, json=body)
            assert answer.status_code == 200 and answer.headers["x-canary-slot"] == "blue", answer.text
            ids.append(answer.headers["x-request-id"])
    store, deadline = stack.prediction_store(), time.monotonic() + 30
    while time.monotonic() < deadline:
        shadowed = {r["request_id"] for r in store.read_range(time.time() - 600, time.time() + 60) if r["shadow"]}
        if shadowed >= set(ids):
            break
        time.sleep(0.2)
    store.close()
    return since


def paired_rows(report: str, version: str) -> int:
    """Rows the shadow gate paired, from its first line, checking it names the candidate."""
    first = report.splitlines()[0]
    assert f"mirrored requests answered by candidate v{version} " in first, report
    return int(first.split("shadow gate: ", 1)[1].split(" rows", 1)[0].replace(",", ""))


def test_a_shadow_gate_fails_a_disagreeing_candidate_and_passes_a_twin(
    stack, stack_settings, candidate_bento, canary_home, built_pipeline
):
    """Issue 15: the validation and test digits (720 distinct, unlabelled) through nginx with
    the candidate at 0% and shadow on; `canary gate --source shadow` judges the copies against
    stable's answers: the scikit-learn candidate fails it, a twin of stable (the same
    training, registered and built again) passes it."""
    from models.bento import build_bento
    from models.data import load_split
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig
    from tests.support.pipeline import EPOCHS

    split = load_split()
    x = np.concatenate([split.x_val, split.x_test])
    if not stack.process("slot-green").alive or stack.store.load().slots["green"].bento != candidate_bento[0]:
        run(stack, plan_deploy(stack.store.load(), *candidate_bento))
    run(stack, plan_shadow(stack.store.load(), True))
    since = replay_through_nginx(stack, x)
    gate = canary_cli(stack_settings, "gate", "--source", "shadow", "--since", since)
    assert gate.returncode == 1 and "Traceback" not in gate.stderr, gate.stdout + gate.stderr
    assert paired_rows(gate.stdout, candidate_bento[1]) >= 713, gate.stdout  # all 720 but a copy lost to a timeout
    verdict = gate.stdout.strip().splitlines()[-1]  # measured: agreement 0.889, confidence KS 0.885
    assert verdict.startswith("fail: ") and "confidence_ks" in verdict, gate.stdout

    twin = train_and_register(canary_home, TrainConfig(model="digits-cnn", epochs=EPOCHS, seed=0))
    export_version(canary_home, version=twin.ref.version)
    twin_bento = build_bento(canary_home, version=twin.ref.version).tag
    try:
        run(stack, plan_deploy(stack.store.load(), twin_bento, str(twin.ref.version)))
        run(stack, plan_shadow(stack.store.load(), True))
        since = replay_through_nginx(stack, x)
        gate = canary_cli(stack_settings, "gate", "--source", "shadow", "--since", since)
        assert gate.returncode == 0, gate.stdout + gate.stderr
        assert paired_rows(gate.stdout, str(twin.ref.version)) >= 713, gate.stdout
        # every mirrored request of the window is expected to have a copy (a copy dropped by
        # nginx's 1 s shadow timeout on a loaded machine is counted, within the 1% budget)
        assert "agreement 1.0000" in gate.stdout and " of 720 mirrored requests without" in gate.stdout
        assert gate.stdout.strip().splitlines()[-1].startswith("pass: 4 checks passed")
    finally:  # the scikit-learn candidate again, shadow off, for the tests that follow
        run(stack, plan_deploy(stack.store.load(), *candidate_bento))


def post_labels(stack: LocalStack, labels: list[dict]) -> None:
    url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits/feedback"
    for start in range(0, len(labels), 1000):  # a post holds at most 1,000 labels
        posted = httpx.post(url, json=labels[start : start + 1000], timeout=30)
        assert posted.status_code == 200, posted.text


def test_a_live_gate_waits_for_labels_then_fails_a_less_accurate_candidate(stack, stack_settings, candidate_bento):
    """Issue 15: the 720 validation and test digits, four times, through nginx with the
    candidate at 50%, labels posted afterwards by request id. The roles are switched first:
    here the session's CNN (3 short epochs, 88.2% on these rows) is the weaker model and the
    linear one (94.0%) the stronger, so the CNN plays the candidate 5.8 points less accurate.
    With labels for only a few answers `canary gate --source live` is inconclusive and says how
    many more it needs; with all of them it fails the candidate on its accuracy drop.

    Four passes, not two: which rows each slot answers is random (the router's shuffled deck),
    and with two passes the slots' samples differed enough that the measured drop fell below
    what the gate needs for a fail in 3.2% of 2,000 simulated splits (seen once in a full run:
    3.26 pp, bound 0.83); with four, 0 of 2,000."""
    from models.data import load_split

    split = load_split()
    x = np.concatenate([split.x_val, split.x_test] * 4)
    y = np.concatenate([split.y_val, split.y_test] * 4)
    if not stack.process("slot-green").alive or stack.store.load().slots["green"].bento != candidate_bento[0]:
        run(stack, plan_deploy(stack.store.load(), *candidate_bento))
    run(stack, plan_switch(stack.store.load()))  # green (linear) stable, blue (the CNN) the candidate
    run(stack, plan_weight(stack.store.load(), 50))
    try:
        since = datetime.now(UTC).isoformat()
        url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits/infer"
        answers = []  # (request id, slot, predicted class, label)
        with httpx.Client(timeout=30) as client:
            for i, (row, label) in enumerate(zip(x, y, strict=True)):
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
                answer = client.post(url, json=body, headers={"X-Request-Id": f"live-{since}-{i}"})
                assert answer.status_code == 200, answer.text
                predicted = int(np.argmax(answer.json()["outputs"][0]["data"]))
                answers.append((answer.headers["x-request-id"], answer.headers["x-canary-slot"], predicted, int(label)))
        ids = [a[0] for a in answers]
        store, deadline = stack.prediction_store(), time.monotonic() + 30
        while len(store.lookup("digits", ids)) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        store.close()
        # The first labels: ten per slot, of answers both slots got right, so the early verdict
        # depends on the label count alone (ten random labels per slot would show a 5-point
        # drop as a fail by chance in ~3% of runs; the unit tests cover the statistics).
        early_ids = {slot: [a[0] for a in answers if a[1] == slot and a[2] == a[3]][:10] for slot in ("blue", "green")}
        first = [{"id": rid, "label": next(a[3] for a in answers if a[0] == rid)} for rids in early_ids.values()
                 for rid in rids]  # fmt: skip
        post_labels(stack, first)
        early = canary_cli(stack_settings, "gate", "--source", "live", "--since", since)
        assert early.returncode == 1 and "Traceback" not in early.stderr, early.stdout + early.stderr
        slots = [a[1] for a in answers]
        counts = f"answered requests: candidate {slots.count('blue'):,}, stable {slots.count('green'):,}"
        assert counts in early.stdout, early.stdout
        verdict = early.stdout.strip().splitlines()[-1]
        assert verdict.startswith("inconclusive: accuracy_drop_pp needs about "), early.stdout
        assert "more labelled candidate rows (about " in verdict and " more requests at 50%)" in verdict

        chosen = {label["id"] for label in first}
        post_labels(stack, [{"id": a[0], "label": a[3]} for a in answers if a[0] not in chosen])
        late = canary_cli(stack_settings, "gate", "--source", "live", "--since", since)
        assert late.returncode == 1, late.stdout + late.stderr
        assert f"labelled rows: candidate {slots.count('blue'):,} (" in late.stdout, late.stdout
        assert late.stdout.strip().splitlines()[-1].startswith("fail: accuracy_drop_pp "), late.stdout
        # both slots publish input drift against the reference exported with their model
        assert re.search(r"input drift PSI: candidate \d+\.\d+ vs stable \d+\.\d+ ", late.stdout), late.stdout

        # every source that applies, the worst decides: Locust (fails the CNN too), shadow
        # (off here: skipped, says so), live
        every = canary_cli(stack_settings, "gate", "--source", "all", "--since", since, "--duration", "8s")
        assert every.returncode == 1 and "Traceback" not in every.stderr, every.stdout + every.stderr
        lines = every.stdout.strip().splitlines()
        assert lines[0] == "== locust" and "== shadow" in lines and "skipped: shadow is off" in lines, every.stdout
        assert lines[-1] == "all: locust fail or inconclusive, live fail or inconclusive", every.stdout
        assert lines[-2].startswith("fail: accuracy_drop_pp "), every.stdout  # the live verdict
    finally:
        run(stack, plan_weight(stack.store.load(), 0))
        run(stack, plan_switch(stack.store.load()))  # blue stable again, for the tests that follow


def test_a_live_rollout_rolls_back_a_less_accurate_candidate_on_its_real_traffic(
    stack, stack_settings, candidate_bento
):
    """`canary rollout --steps 50 --step-duration 15s --source live` while an application sends
    the digits through nginx and posts each answer's label a moment later: the step is judged
    on those requests, and the CNN (5.7 points below the linear model, roles switched as in the
    live gate test) is rolled back to 0% without a Locust user."""
    from models.data import load_split

    split = load_split()
    x, y = np.concatenate([split.x_val, split.x_test]), np.concatenate([split.y_val, split.y_test])
    if not stack.process("slot-green").alive or stack.store.load().slots["green"].bento != candidate_bento[0]:
        run(stack, plan_deploy(stack.store.load(), *candidate_bento))
    run(stack, plan_switch(stack.store.load()))  # green (linear) stable, blue (the CNN) the candidate
    stop, sent, labelled = threading.Event(), [0], [0]
    url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits"
    tag = datetime.now(UTC).strftime("%H%M%S%f")

    def application() -> None:
        pending: list[tuple[float, str, int]] = []
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                i = sent[0]
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                    "data": x[i % len(x)].tolist()}]}  # fmt: skip
                answer = client.post(f"{url}/infer", json=body, headers={"X-Request-Id": f"app-{tag}-{i}"})
                sent[0] += 1
                if answer.status_code == 200:
                    pending.append((time.monotonic(), answer.headers["x-request-id"], int(y[i % len(x)])))
                ready = [p for p in pending if time.monotonic() - p[0] > 1.5]  # logged by now (0.5 s flush)
                if len(ready) >= 100:
                    labels = [{"id": rid, "label": label} for _, rid, label in ready]
                    assert client.post(f"{url}/feedback", json=labels).status_code == 200
                    labelled[0] += len(labels)
                    pending = pending[len(ready) :]

    app_thread = threading.Thread(target=application, daemon=True)
    app_thread.start()
    try:
        result = canary_cli(stack_settings, "rollout", "--steps", "50", "--step-duration", "15s", "--source", "live",
                            "--bake", "0")  # fmt: skip
    finally:
        stop.set()
        app_thread.join(30)
        if stack.store.load().weight:
            run(stack, plan_weight(stack.store.load(), 0))
        run(stack, plan_switch(stack.store.load()))  # blue stable again, for the tests that follow
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "rolled back to 0%: gate fail at 50%: fail: accuracy_drop_pp" in result.stderr, result.stderr
    assert "live gate:" in result.stderr and sent[0] > 400 and labelled[0] > 400, (sent, labelled, result.stderr)
    history = stack.store.history.entries()
    assert any(e["action"] == "gate" and "(live) at 50%" in e["detail"] for e in history[-5:]), history[-5:]


def test_the_locustfile_loads_every_protocol_of_both_slots_without_a_failure(stack, candidate_bento, tmp_path):
    """The issue's command through Locust's own CLI (`locust -f loadtest/locustfile.py
    --headless -u 32 -r 32 -t 8s --host <nginx>`, gRPC on the stack's nginx gRPC port) with
    the candidate at 50%: every protocol is answered by both slots, each request named by the
    slot and model version that answered, and not one fails."""
    state = run(stack, plan_weight(stack.store.load(), 50))
    try:
        done, rows = locust_cli(stack, tmp_path, "--headless", "-u", "32", "-r", "32", "-t", "8s")
    finally:
        run(stack, plan_weight(stack.store.load(), 0))
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {request_name(protocol, slot, state.slots[slot].model_version)
                for protocol in PROTOCOLS for slot in ("blue", "green")}  # fmt: skip
    assert set(rows) - {"Aggregated"} == expected, rows.keys()
    assert all(int(rows[name]["Request Count"]) > 0 for name in expected)
    assert rows["Aggregated"]["Failure Count"] == "0", (tmp_path / "run_failures.csv").read_text()
    assert (tmp_path / "run_accuracy.csv").read_text().count(" v") == len(expected)  # every name's accuracy


def test_a_master_and_two_workers_deliver_the_load_of_one_process(stack):
    """`canary loadtest --headless` in one Locust process and, at the same time (both share
    whatever else the machine does), as Locust's master with 2 local workers: 16 users paced
    at 4 requests/s each for 8 s, a pace a single process keeps, so both runs are set by the
    pacing, not by the machine's CPU. The distributed run delivers requests at the same rate
    (within 20%) while it runs, without a failure, and its workers are gone afterwards."""
    paced = ("--users", "16", "--spawn-rate", "16", "--duration", "8s", "--user-rate", "4")
    single, distributed = canary_loadtests(stack, paced, (*paced, "--workers", "2"))
    for result in (single, distributed):
        assert result.done.returncode == 0, result.done.stderr[-3000:]
        assert result.total["Failure Count"] == "0" and (result.report_dir / "report.html").is_file()
    assert "to 2 ready workers" in distributed.done.stderr
    one, two = single.rate(), distributed.rate()
    assert two >= 0.8 * one, (one, two)
    (line,) = [line for line in distributed.done.stderr.splitlines() if line.startswith("Locust master + 2 workers")]
    pids = [int(pid) for pid in line.split("(pids ", 1)[1].split(";", 1)[0].split(", ")]
    assert len(pids) == 2 and not any(psutil.pid_exists(pid) for pid in pids)


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
    assert rest(stack, forced(stack, "always")).headers["x-model-version"] == candidate_bento[1]


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


def canary_cli(stack_settings: StackSettings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **{f"CANARY_STACK_{k.upper()}": json.dumps(v) if isinstance(v, list) else str(v)
                            for k, v in stack_settings.model_dump().items()}}  # fmt: skip
    canary = str(Path(sys.executable).parent / "canary")
    return subprocess.run([canary, *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_candidate_killed_at_30_percent_costs_no_request_and_cannot_be_promoted(
    stack, stack_settings, candidate_bento, tmp_path
):
    if not stack.process("slot-green").alive:
        run(stack, plan_deploy(stack.store.load(), *candidate_bento))
    run(stack, plan_weight(stack.store.load(), 30))
    load = Load(stack, tmp_path)
    try:
        assert load.shares(at_least=300)["green"] > 0
        killed_at = time.monotonic()
        kill_tree(stack.process("slot-green").pid)  # a crash: the server and its workers die at once
        after = load.shares(at_least=1000, settle_s=1.0)
        grpc_done_after_kill = load.grpc_done
        load.shares(at_least=300)
        grpc_calls_later = load.grpc_done - grpc_done_after_kill
    finally:
        requests, failures, details = load.stop()
    # REST: nginx replays a request the dying slot never answered on stable. gRPC: nginx streams
    # the body to the slot and cannot replay it, so a call sent while the slot dies may fail with
    # UNAVAILABLE (retryable; README: gRPC clients should retry it). Usually that is the one call
    # in flight; CI once saw two (the next call reached a socket still closing). Every later
    # call finds the port closed and nginx retries it on stable: no failure after the instant.
    assert failures == 0, details
    assert all("UNAVAILABLE" in f for f in load.grpc_failures), load.grpc_failures
    late = [round(t - killed_at, 2) for t in load.grpc_failed_at if t - killed_at > 2.0]
    assert not late, f"gRPC calls failed {late} s after the kill: {load.grpc_failures}"
    assert grpc_calls_later > 20, "the gRPC loop stopped answering after the kill"
    assert requests > 300 and after["green"] == 0, (requests, after)
    status = canary_cli(stack_settings, "status")
    green_line = next(line for line in status.stdout.splitlines() if line.startswith("green"))
    assert "DEAD" in green_line, status.stdout
    before = stack.store.load()
    promote = canary_cli(stack_settings, "promote", "--bake", "0")
    assert promote.returncode == 1 and "Traceback" not in promote.stderr
    assert "slot green" in promote.stderr.strip().splitlines()[-1] and "traffic stays" in promote.stderr
    assert stack.store.load() == before
    assert {rest(stack).headers["x-canary-slot"] for _ in range(20)} == {"blue"}


def test_promote_through_the_cli_moves_the_champion_alias(stack, stack_settings, candidate_bento, canary_home):
    from models.registry import Registry

    if not stack.process("slot-green").alive:
        run(stack, plan_deploy(stack.store.load(), *candidate_bento))
    result = canary_cli(stack_settings, "promote", "--bake", "0")
    assert result.returncode == 0, result.stderr
    state = stack.store.load()
    assert (state.stable, state.candidate) == ("green", None) and not stack.process("slot-blue").alive
    assert "champion" in Registry(canary_home).get(int(candidate_bento[1])).aliases
    assert {rest(stack).headers["x-model-version"] for _ in range(10)} == {candidate_bento[1]}

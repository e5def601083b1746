"""A slot of two worker processes (`CANARY_SERVICE_WORKERS=2`), really served: both workers
listen on the V2 REST and gRPC ports, both answer, every protocol answers exactly as the
one-worker slot does, /metrics adds the workers up, and the slot is not ready while one of
its workers is gone."""

from __future__ import annotations

import signal
import time

import grpc
import httpx
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb2
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from models.data import load_split
from tests.support.metrics import scrape, total
from tests.support.predlog import INFER
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow
ROWS = 120  # distinct test digits, one per request and per connection (the cache is off)


def v2_body(row: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}


def grpc_request(row: np.ndarray) -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(row.astype("<f4").tobytes())
    return request


@pytest.fixture(scope="module")
def two_workers(built_pipeline, canary_home, session_redis):
    from deploy.process import free_port, served_bento

    grpc_port, rest_port, port = free_port(), free_port(), free_port()
    env = {
        "CANARY_SERVICE_WORKERS": "2",
        "CANARY_SERVICE_GRPC_PORT": str(grpc_port),
        "CANARY_SERVICE_REST_PORT": str(rest_port),
        "CANARY_SERVICE_SLOT": "two-workers",
        "CANARY_SERVICE_PREDICTION_LOG_URL": session_redis.url,
    }
    with served_bento(built_pipeline.bento_tag, port, canary_home.logs / "two-workers.log", env) as base:
        yield base, rest_port, grpc_port


def _listeners(port: int) -> set[int]:
    return {
        c.pid for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    }  # fmt: skip


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_two_workers_share_the_ports_answer_like_one_and_add_up_in_metrics(two_workers, serving):
    base, rest_port, grpc_port = two_workers
    workers = _listeners(rest_port)
    assert len(workers) == 2, f"V2 REST listeners: {workers}"
    assert _listeners(grpc_port) == workers  # the same two processes hold the gRPC port
    for pid in workers:  # each worker has a log writer of its own
        writers = [c for c in psutil.Process(pid).children() if "service.predlog_process" in " ".join(c.cmdline())]
        assert len(writers) == 1, f"worker {pid}: {writers}"

    x = load_split().x_test[:ROWS]
    before = {pid: _cpu(pid) for pid in workers}
    requests_before = total(scrape(base), "canary_requests_total")
    rest, grpc_classes, native = [], [], []
    for row in x:  # a new connection each time: the kernel spreads connections over the workers
        answer = httpx.post(f"http://127.0.0.1:{rest_port}{INFER}", json=v2_body(row), timeout=30)
        assert answer.status_code == 200, answer.text
        rest.append(int(np.argmax(answer.json()["outputs"][0]["data"])))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            response = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(grpc_request(row), timeout=30)
        grpc_classes.append(int(np.frombuffer(response.raw_output_contents[0], "<f4").argmax()))
    for chunk in np.array_split(x, 4):
        answer = httpx.post(f"{base}/classify", json={"pixels": chunk.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        native += answer.json()["classes"]

    reference = [int(np.argmax(r)) for r in _one_worker_scores(serving.v2, x)]
    assert rest == grpc_classes == native == reference
    busy = {pid: _cpu(pid) - before[pid] for pid in workers}
    assert all(seconds > 0.05 for seconds in busy.values()), f"CPU seconds per worker during the load: {busy}"
    # /metrics (either worker answers it) counts both workers' requests
    wait_until(
        lambda: total(scrape(base), "canary_requests_total") >= requests_before + 2 * ROWS + 4,
        10,
        "every request in the aggregated counter",
    )


def _one_worker_scores(v2_url: str, x: np.ndarray) -> list[list[float]]:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    answer = httpx.post(v2_url + INFER, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return np.asarray(answer.json()["outputs"][0]["data"]).reshape(len(x), -1).tolist()


def _grpc_health(port: int) -> str:
    """grpc.health.v1 Check over a new connection (the kernel picks the worker)."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    except grpc.RpcError as exc:
        return exc.code().name


def test_the_slot_is_not_ready_while_one_of_its_workers_is_gone(two_workers):
    """REST readiness and the gRPC health service both follow the whole slot: whichever
    worker answers, the slot is not ready while its sibling is gone."""
    base, rest_port, grpc_port = two_workers
    workers = sorted(_listeners(rest_port))
    assert len(workers) == 2
    assert _grpc_health(grpc_port) == "SERVING"
    psutil.Process(workers[0]).send_signal(signal.SIGKILL)  # a worker of the server this test started
    seen, health = [], []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            seen.append(httpx.get(f"{base}/v2/health/ready", timeout=5).status_code)
        except httpx.TransportError:
            seen.append(0)
        health.append(_grpc_health(grpc_port))
        if 503 in seen and "NOT_SERVING" in health and seen[-1] == 200 and len(_listeners(rest_port)) == 2:
            if health[-1] == "SERVING":
                break
        time.sleep(0.05)
    assert 503 in seen, f"readiness never dropped: {seen[:20]}"
    assert "NOT_SERVING" in health, f"gRPC health never dropped: {health[:20]}"
    assert seen[-1] == 200, f"the replaced worker never made the slot ready again: {seen[-20:]}"
    assert health[-1] == "SERVING", f"gRPC health never came back: {health[-20:]}"
    assert workers[0] not in _listeners(rest_port)  # a new process took its place

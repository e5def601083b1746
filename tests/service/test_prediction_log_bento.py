"""The prediction log and feedback in a real `bentoml serve` (logging to the session's real
redis-server): every protocol's answer is logged under the id its client got back, and
labels become the version's online accuracy on /metrics."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import psutil
import pytest
from tritonclient.grpc import service_pb2 as pb2
from tritonclient.grpc import service_pb2_grpc as pb2_grpc

from models.data import load_split
from service.sinks import open_store
from tests.support.metrics import scrape, total
from tests.support.predlog import FEEDBACK, INFER
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def v2_body(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}]}


def test_every_protocol_is_logged_under_its_id_and_labels_become_online_accuracy(serving, built_pipeline):
    version, x = str(built_pipeline.version), load_split().x_test[100:104]
    tag = f"{time.time_ns():x}"  # ids of this run only: the session's Redis outlives tests
    ids = {p: f"{p}-{tag}" for p in ("v2", "mount", "grpc", "native")}
    written_before = total(scrape(serving.url), "canary_prediction_log_written_total")
    predicted = {}
    v2 = httpx.post(serving.v2 + INFER, json=v2_body(x[0:1]), headers={"X-Request-Id": ids["v2"]}, timeout=30)
    mount = httpx.post(serving.url + INFER, json=v2_body(x[1:2]), headers={"X-Request-Id": ids["mount"]}, timeout=30)
    for name, answer in (("v2", v2), ("mount", mount)):
        assert answer.headers["x-request-id"] == answer.json()["id"] == ids[name]
        predicted[name] = int(np.argmax(answer.json()["outputs"][0]["data"]))
    request = pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(x[2:3].astype("<f4").tobytes())
    with grpc.insecure_channel(serving.grpc) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", ids["grpc"]),), timeout=30)
    assert response.id == dict(call.trailing_metadata())["x-request-id"] == ids["grpc"]
    predicted["grpc"] = int(np.frombuffer(response.raw_output_contents[0], "<f4").argmax())
    native = httpx.post(f"{serving.url}/classify", json={"pixels": x[3:4].tolist()},
                        headers={"X-Request-Id": ids["native"]}, timeout=30)  # fmt: skip
    assert native.status_code == 200 and native.headers["x-request-id"] == ids["native"]
    predicted["native"] = native.json()["classes"][0]

    store = open_store(serving.redis.url)
    wait_until(lambda: len(store.lookup("digits", list(ids.values()))) == 4, 30, "all four answers in the log")
    rows = {r["request_id"]: r for r in store.read_range(time.time() - 300, time.time() + 60) if tag in r["request_id"]}
    assert {name: rows[rid]["protocol"] for name, rid in ids.items()} == {
        "v2": "rest", "mount": "rest", "grpc": "grpc", "native": "bentoml"}  # fmt: skip
    assert {name: rows[rid]["classes"] for name, rid in ids.items()} == {k: [v] for k, v in predicted.items()}
    assert {(r["slot"], r["model_version"]) for r in rows.values()} == {("test", version)}
    # the counter follows the rows: the writer reports them written after the store has them
    wait_until(lambda: total(scrape(serving.url), "canary_prediction_log_written_total") >= written_before + 4,
               10, "the written counter to count the four rows")  # fmt: skip
    # written by the slot's log writer process, a child of the worker that answered
    port = int(serving.v2.rsplit(":", 1)[1])
    worker = next(psutil.Process(c.pid) for c in psutil.net_connections("tcp") if c.laddr.port == port and c.pid)
    assert [" ".join(c.cmdline()[-2:]) for c in worker.children()] == ["-m service.predlog_process"]

    labels = [{"id": ids[name], "label": predicted[name]} for name in ("v2", "mount", "grpc")]
    labels.append({"id": ids["native"], "label": (predicted["native"] + 1) % 10})  # one wrong
    answer = httpx.post(serving.v2 + FEEDBACK, json=labels, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"accepted": 4, "duplicates": 0}
    tally = store.tallies("digits")[version]
    samples = scrape(serving.url)
    assert total(samples, "canary_online_labels", version=version) == tally.labels
    assert total(samples, "canary_online_accuracy", version=version) == pytest.approx(tally.correct / tally.labels)
    assert total(samples, "canary_feedback_labels_total", predicted_version=version) >= 4

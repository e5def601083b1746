"""The prediction log's writer in a process of its own (service/predlog_process.py): the
frame a batch travels in, and the child process under faults, with a real redis-server and
the real V2 listener. Every record is either written or counted as dropped, and no request
notices the writer dying or hanging."""

from __future__ import annotations

import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest

from service.core.predlog import Prediction
from service.core.predlog_wire import HEADER, pack, unpack
from service.sinks import open_store
from tests.support.predlog import INFER, logged_server
from tests.support.redis_server import redis_server  # noqa: F401
from tests.support.tiny_model import digits_rows
from tests.support.waiting import wait_until

STREAM = "canary:predlog:stream"


def body(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}


def test_a_batch_crosses_the_pipe_unchanged_nan_and_odd_dtypes_included():
    batch = [
        Prediction("a", 1796247579.4606981, "rest", False, 0.0021, np.arange(128, dtype=np.float32).reshape(2, 64),
                   "FP32", [3, 4], [0.5, 0.25]),
        Prediction("b", 1796247580.1, "grpc", True, 0.5, np.array([[1, -2, 3]], dtype=">i8"), "INT64", [1],
                   [float("nan")]),
        Prediction("c", 1.0, "bentoml", False, 0.0, np.zeros((0, 64), np.float32), "FP32", [], []),
    ]  # fmt: skip
    frame = pack(batch)
    columns_len, inputs_len = HEADER.unpack_from(frame)
    back = unpack(frame[HEADER.size : HEADER.size + columns_len], frame[HEADER.size + columns_len :])
    assert len(back) == 3 and inputs_len == 2 * 64 * 4 + 3 * 8
    for sent, got in zip(batch, back, strict=True):
        assert (got.request_id, got.time, got.protocol, got.shadow, got.latency_s, got.datatype, got.classes) == (
            sent.request_id, sent.time, sent.protocol, sent.shadow, sent.latency_s, sent.datatype, sent.classes)  # fmt: skip
        np.testing.assert_array_equal(got.inputs, sent.inputs)
    assert back[0].confidences == [0.5, 0.25] and math.isnan(back[1].confidences[0])
    with pytest.raises(ValueError, match="unreadable|left over"):
        unpack(frame[HEADER.size : HEADER.size + columns_len], frame[HEADER.size + columns_len :] + b"xx")
    with pytest.raises(ValueError, match="unreadable"):
        unpack(b'{"id": ["a"]}', b"")


def writer_of(server) -> psutil.Process:
    pid = wait_until(lambda: server.predlog.child_pid, 10, "the writer process")
    child = psutil.Process(pid)
    assert child.ppid() == os.getpid() and pid != os.getpid()
    return child


def test_a_killed_writer_is_replaced_and_every_record_is_written_or_counted(tmp_path, redis_server):  # noqa: F811
    """The writer process frozen, then SIGKILLed with records in its pipe, while requests go
    on: each request is answered, a new writer takes over, and rows written + records counted
    as dropped = requests answered (what died in the pipe is counted, reason sink)."""
    store = open_store(redis_server.url)
    x = digits_rows(600, seed=2)
    with logged_server(tmp_path, store, process_url=redis_server.url, batch_size=20) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:  # fmt: skip
        first = writer_of(server)

        def call(i: int) -> int:
            return client.post(INFER, headers={"X-Request-Id": f"r{i}"}, json=body(x[i : i + 1])).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(call, range(200)))
            wait_until(lambda: server.observer.written == 200, 10, "the first 200 rows")
            first.send_signal(signal.SIGSTOP)
            statuses += pool.map(call, range(200, 400))
            time.sleep(0.3)  # the log's writer thread has shipped what it held into the pipe
            first.kill()
            first.wait(10)
            statuses += pool.map(call, range(400, 600))
        assert statuses == [200] * 600
        accounted = lambda: server.observer.written + sum(server.observer.dropped.values())  # noqa: E731
        wait_until(lambda: accounted() == 600, 20, "all 600 records written or counted")
    rows = {row["request_id"] for row in store.read_range(0, 4e9)}
    assert len(rows) == redis_server.client().xlen(STREAM) == server.observer.written
    assert server.predlog.restarts == 1 and server.predlog.child_pid != first.pid
    # before the freeze all written, after the new writer all written; in between what was in
    # the dead writer's pipe is lost (more than the pipe holds may have waited in our buffer)
    assert {f"r{i}" for i in (*range(200), *range(400, 600))} <= rows and len(rows) < 600
    assert server.observer.dropped == {"sink": 600 - len(rows)}, server.observer.dropped


def test_a_hung_writer_is_replaced_and_costs_no_request(tmp_path, redis_server):  # noqa: F811
    """The writer process frozen (SIGSTOP): its pipe fills, it takes nothing for the hang
    timeout (1 s here) and is killed and replaced; requests are answered all along and every
    record is written or counted."""
    store = open_store(redis_server.url)
    x = digits_rows(400, seed=3)
    with logged_server(tmp_path, store, process_url=redis_server.url, batch_size=10, keep_inputs=True,
                       hang_timeout_s=1.0) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:  # fmt: skip
        frozen = writer_of(server)
        frozen.send_signal(signal.SIGSTOP)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: client.post(INFER, json=body(x[i : i + 1])).status_code, range(400)))
        assert statuses == [200] * 400
        accounted = lambda: server.observer.written + sum(server.observer.dropped.values())  # noqa: E731
        wait_until(lambda: accounted() == 400, 20, "all 400 records written or counted")
        assert frozen.wait(5) is not None or not frozen.is_running()  # killed, not left frozen
        assert server.predlog.restarts == 1 and server.predlog.child_pid != frozen.pid
        started = time.monotonic()
    assert time.monotonic() - started < 10  # closing waited for nothing frozen
    written = redis_server.client().xlen(STREAM)
    assert 0 < written == server.observer.written < 400 and server.observer.dropped["sink"] > 0


def test_closing_with_a_frozen_writer_counts_every_record_once_and_starts_no_other(redis_server):  # noqa: F811
    """The writer process frozen with more in flight than its pipe holds, then the log closed
    with a short timeout: close returns, the frozen writer is killed, no writer is started
    after it, and written + dropped = offered exactly (nothing counted twice)."""
    from service.core.predlog import Prediction
    from service.predlog_process import ProcessPredictionLog
    from tests.support.predlog import RecordingObserver, process_spec

    observer = RecordingObserver()
    predlog = ProcessPredictionLog(process_spec(redis_server.url, batch_size=20), observer, hang_timeout_s=30.0)
    predlog.start()
    frozen = psutil.Process(wait_until(lambda: predlog.child_pid, 10, "the writer process"))
    rows = digits_rows(1, seed=4)
    offer = lambda i: predlog.offer(Prediction(f"r{i}", time.time(), "rest", False, 0.001, rows, "FP32", [1], [0.5]))  # noqa: E731
    assert all(offer(i) for i in range(100))
    wait_until(lambda: observer.written == 100, 10, "the first 100 rows")
    frozen.send_signal(signal.SIGSTOP)
    assert all(offer(i) for i in range(100, 3100))  # ~1 MB of frames: more than the pipe holds
    time.sleep(0.5)
    started = time.monotonic()
    predlog.close(1.0)
    assert time.monotonic() - started < 10
    assert frozen.wait(5) is not None or not frozen.is_running()
    assert predlog.restarts == 0 and not predlog._thread.is_alive()
    assert observer.written == redis_server.client().xlen(STREAM) and observer.written < 3100
    assert observer.written + sum(observer.dropped.values()) == 3100, (observer.written, observer.dropped)

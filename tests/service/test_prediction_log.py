"""The prediction log behind the real V2 REST listener (tiny model, in process) with a real
redis-server or PostgreSQL: request ids, every answer logged, drops counted and never felt.

The 10,000-request proof (and the on/off throughput) is `python -m bench.predlog_proof`.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from deploy.predictions import export_predictions
from service.sinks import open_store
from tests.support.postgres_server import PASSWORD, postgres_server  # noqa: F401
from tests.support.predlog import INFER, logged_server
from tests.support.redis_server import redis_server  # noqa: F401
from tests.support.tiny_model import digits_rows
from tests.support.waiting import wait_until

STREAM = "canary:predlog:stream"
HEX32 = r"^[0-9a-f]{32}$"


def body(rows: np.ndarray, **extra) -> dict:
    return {
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}],
        **extra,
    }


def logged_rows(store) -> dict[str, dict]:
    return {row["request_id"]: row for row in store.read_range(0, 4e9)}


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_every_answer_of_a_burst_is_logged_under_the_id_its_client_got(tmp_path, redis_server, writer):  # noqa: F811
    store = open_store(redis_server.url)
    x = digits_rows(1000, seed=1)
    process_url = redis_server.url if writer == "process" else None
    with (
        logged_server(tmp_path, store, process_url=process_url) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):

        def call(i: int) -> tuple[str, int, int]:
            headers = {"X-Request-Id": f"client-{i}"} if i % 2 else {}  # half bring their own id
            answer = client.post(INFER, json=body(x[i : i + 1]), headers=headers)
            assert answer.status_code == 200, answer.text
            return answer.headers["x-request-id"], int(np.argmax(answer.json()["outputs"][0]["data"])), i

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(1000)))
        wait_until(lambda: server.observer.written == 1000, 20, "all 1,000 rows written")
        assert sum(server.observer.dropped.values()) == 0
    rows = logged_rows(store)
    assert len(rows) == 1000 == redis_server.client().xlen(STREAM)
    for request_id, predicted, i in answers:
        assert request_id == f"client-{i}" if i % 2 else re.match(HEX32, request_id)
        row = rows[request_id]
        assert row["classes"] == [predicted] and row["rows"] == 1 and row["protocol"] == "rest"
        assert row["input_sha256"] == hashlib.sha256(x[i : i + 1].astype("<f4").tobytes()).hexdigest()
        assert row["input_b64"] is None  # inputs stay out unless asked for


def test_request_ids_are_kept_when_sane_made_when_missing_and_echoed(tmp_path, redis_server):  # noqa: F811
    row = digits_rows(1)
    with logged_server(tmp_path, open_store(redis_server.url)) as server, httpx.Client(base_url=server.url) as client:
        made = client.post(INFER, json=body(row))
        assert made.headers["x-request-id"] == made.json()["id"]
        assert len(made.json()["id"]) == 32 and int(made.json()["id"], 16) >= 0
        kept = client.post(INFER, json=body(row), headers={"X-Request-Id": "order-17.a:b_c"})
        assert kept.headers["x-request-id"] == kept.json()["id"] == "order-17.a:b_c"
        for hostile in ("has space", "x" * 129, "semi;colon", "caf\u00e9"):
            replaced = client.post(INFER, json=body(row), headers={"X-Request-Id": hostile.encode()})
            assert replaced.status_code == 200 and replaced.headers["x-request-id"] != hostile
            assert len(replaced.headers["x-request-id"]) == 32
        own = client.post(INFER, json=body(row, id="the-clients-v2-id"), headers={"X-Request-Id": "rid-1"})
        assert own.json()["id"] == "the-clients-v2-id" and own.headers["x-request-id"] == "rid-1"
        refused = client.post(INFER, json={"inputs": []}, headers={"X-Request-Id": "rid-2"})
        assert refused.status_code == 400 and refused.headers["x-request-id"] == "rid-2"
        wait_until(lambda: server.observer.written == 7, 10, "the 7 answered requests logged")
    assert set(logged_rows(open_store(redis_server.url))) >= {made.json()["id"], "order-17.a:b_c", "rid-1"}


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_inputs_are_logged_when_asked_in_a_form_a_replay_can_read(tmp_path, redis_server, writer):  # noqa: F811
    import base64

    rows = digits_rows(3, seed=4)
    store = open_store(redis_server.url)
    process_url = redis_server.url if writer == "process" else None
    with (
        logged_server(tmp_path, store, keep_inputs=True, process_url=process_url) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        rid = client.post(INFER, json=body(rows)).headers["x-request-id"]
        wait_until(lambda: server.observer.written == 1, 10, "the row")
    row = logged_rows(store)[rid]
    assert (row["input_datatype"], row["input_shape"], row["rows"]) == ("FP32", [3, 64], 3)
    back = np.frombuffer(base64.b64decode(row["input_b64"]), "<f4").reshape(row["input_shape"])
    np.testing.assert_array_equal(back, rows)


def test_a_full_buffer_counts_drops_and_fails_no_request(tmp_path, redis_server):  # noqa: F811
    """Redis hangs (SIGSTOP): the writer blocks on it, the 20-record buffer fills, and every
    request beyond is still answered at once while its record is dropped and counted."""
    store = open_store(redis_server.url, timeout_s=120.0)  # the blocked write outlasts the freeze
    options = {"max_records": 20, "batch_size": 10}
    with logged_server(tmp_path, store, **options) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.post(INFER, json=body(digits_rows(1))).raise_for_status()
        wait_until(lambda: server.observer.written == 1, 10, "the first row")
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            statuses = [client.post(INFER, json=body(digits_rows(1, seed=i))).status_code for i in range(80)]
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        assert statuses == [200] * 80
        counts = server.observer
        wait_until(lambda: counts.written + sum(counts.dropped.values()) == 81, 30, "every record accounted for")
        assert counts.dropped["buffer_full"] >= 80 - 2 * 20, counts.dropped
    assert redis_server.client().xlen(STREAM) == counts.written


def test_redis_down_costs_no_request_and_the_drops_are_counted(tmp_path, redis_server):  # noqa: F811
    store = open_store(redis_server.url, timeout_s=0.2)
    with logged_server(tmp_path, store) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        redis_server.kill()
        statuses = [client.post(INFER, json=body(digits_rows(1, seed=i))).status_code for i in range(40)]
        assert statuses == [200] * 40
        wait_until(lambda: server.observer.dropped["sink"] == 40, 20, "40 dropped records")
        redis_server.restart()  # back: logging resumes
        client.post(INFER, json=body(digits_rows(1))).raise_for_status()
        wait_until(lambda: server.observer.written == 1, 20, "logging to resume")


def test_postgres_down_costs_no_request_and_the_drops_are_counted(tmp_path, postgres_server):  # noqa: F811
    store = open_store(postgres_server.url, password=PASSWORD)
    with logged_server(tmp_path, store) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.post(INFER, json=body(digits_rows(1))).raise_for_status()
        wait_until(lambda: server.observer.written == 1, 20, "the first row in PostgreSQL")
        postgres_server.stop()
        try:
            statuses = [client.post(INFER, json=body(digits_rows(1, seed=i))).status_code for i in range(40)]
            assert statuses == [200] * 40
            wait_until(lambda: server.observer.dropped["sink"] == 40, 30, "40 dropped records")
        finally:
            postgres_server.restart()
        client.post(INFER, json=body(digits_rows(1))).raise_for_status()
        wait_until(lambda: server.observer.written == 2, 30, "logging to resume after a reconnect")


def test_postgres_receives_the_same_records_as_the_redis_log(tmp_path, redis_server, postgres_server):  # noqa: F811
    """The same 60 requests (ids, inputs, model) to a slot logging to Redis and to one logging
    to PostgreSQL: both exports hold the same records, field for field (time aside)."""
    import pyarrow.parquet as pq

    x = digits_rows(60, seed=9)
    stores = {"redis": open_store(redis_server.url), "postgres": open_store(postgres_server.url, password=PASSWORD)}
    since = time.time()
    tables = {}
    for name, store in stores.items():
        (tmp_path / name).mkdir()
        with logged_server(tmp_path / name, store, slot="same") as server, httpx.Client(base_url=server.url) as client:
            for i in range(60):
                rows = x[i : i + 1 + i % 3]  # 1-3 rows per request
                client.post(INFER, json=body(rows), headers={"X-Request-Id": f"same-{i}"}).raise_for_status()
            wait_until(lambda: server.observer.written == 60, 20, f"60 rows in {name}")  # noqa: B023
        out = tmp_path / f"{name}.parquet"
        result = export_predictions(store, out, since, since + 600, slot="same")
        assert result.rows == 60
        tables[name] = pq.read_table(out).drop(["time", "latency_ms"]).sort_by("request_id").to_pylist()
    assert tables["redis"] == tables["postgres"]
    by_id = {row["request_id"]: row for row in tables["redis"]}
    assert len(by_id) == 60 and len(by_id["same-2"]["classes"]) == 3 and by_id["same-2"]["input_shape"] == [3, 64]


def test_a_redis_store_that_answers_garbage_is_a_dropped_batch_not_a_crash(tmp_path, redis_server):  # noqa: F811
    """The stream key taken by a plain string: XADD fails with WRONGTYPE on every batch."""
    redis_server.client().set(STREAM, "not a stream")
    with logged_server(tmp_path, open_store(redis_server.url)) as server, httpx.Client(base_url=server.url) as client:
        assert [client.post(INFER, json=body(digits_rows(1))).status_code for _ in range(5)] == [200] * 5
        wait_until(lambda: server.observer.dropped["sink"] == 5, 10, "5 dropped records")
    with pytest.raises(redis.ResponseError):
        redis_server.client().xlen(STREAM)


def test_a_batch_written_by_the_script_reads_back_field_for_field(redis_server):  # noqa: F811
    """One Lua call writes a batch: every documented field comes back as written (time to the
    microsecond), odd rows included, and only non-shadow rows are found for the label join."""
    store = open_store(redis_server.url)
    now = time.time()
    rows = [
        {"request_id": "plain-1", "time": now, "slot": "blue", "model": "digits", "model_version": "7",
         "protocol": "rest", "shadow": False, "rows": 2, "classes": [3, 9], "confidences": [0.875, 0.12345678901234568],
         "latency_ms": 4.125, "input_datatype": "FP32", "input_shape": [2, 64], "input_sha256": "ab" * 32,
         "input_b64": None},
        {"request_id": "copy-1", "time": now + 0.000123, "slot": "green", "model": "digits", "model_version": "8",
         "protocol": "grpc", "shadow": True, "rows": 1, "classes": [0], "confidences": [float("nan")], "latency_ms": 0.0,
         "input_datatype": "FP32", "input_shape": [], "input_sha256": "cd" * 32, "input_b64": "AAAA"},
    ]  # fmt: skip
    store.write(rows)
    back = logged_rows(store)
    assert set(back) == {"plain-1", "copy-1"}
    assert np.isnan(back["copy-1"].pop("confidences")[0])  # a broken model's NaN stays NaN, not null
    rows[1] = {k: v for k, v in rows[1].items() if k != "confidences"}
    for row in rows:
        got = back[row["request_id"]]
        assert got["time"] == pytest.approx(row["time"], abs=1e-6)
        assert {k: v for k, v in got.items() if k != "time"} == {
            **{k: str(v) for k, v in row.items() if k not in ("time", "classes", "confidences", "input_shape")},
            "rows": row["rows"], "latency_ms": row["latency_ms"], "shadow": row["shadow"],
            "classes": row["classes"], "input_shape": row["input_shape"],
            **({"confidences": row["confidences"]} if "confidences" in row else {}),
            "input_b64": row["input_b64"],
        }  # fmt: skip
    found = store.lookup("digits", ["plain-1", "copy-1"])
    assert list(found) == ["plain-1"]  # a shadow copy is never what a label is joined to
    assert found["plain-1"].classes == (3, 9) and found["plain-1"].confidences == (0.875, 0.12345678901234568)
    assert found["plain-1"].model_version == "7" and found["plain-1"].latency_ms == 4.125
    store.write([])  # nothing to write is not a call
    assert redis_server.client().xlen(STREAM) == 2

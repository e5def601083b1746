"""service/core/predlog.py: the row a prediction becomes, and the bounded buffer in front of a
real store (a real redis-server): full means dropped and counted, never waited for."""

from __future__ import annotations

import base64
import hashlib
import time

import numpy as np

from service.core.predlog import LogIdentity, Prediction, PredictionLog, to_row
from service.sinks import open_store
from tests.support.predlog import RecordingObserver
from tests.support.redis_server import redis_server  # noqa: F401
from tests.support.waiting import wait_until

WHO = LogIdentity("blue", "digits", "3")


def prediction(request_id: str, rows: np.ndarray) -> Prediction:
    return Prediction(request_id, time.time(), "rest", False, 0.0021, rows, "FP32", [3] * len(rows), [0.5] * len(rows))


def test_a_row_carries_the_inputs_hash_and_its_bytes_only_when_asked():
    rows = np.arange(128, dtype=np.float32).reshape(2, 64)
    quiet, full = to_row(prediction("a", rows), WHO, False), to_row(prediction("a", rows), WHO, True)
    assert quiet["input_sha256"] == hashlib.sha256(rows.astype("<f4").tobytes()).hexdigest()
    assert quiet["input_b64"] is None and quiet["input_shape"] == [2, 64] and quiet["rows"] == 2
    assert (quiet["slot"], quiet["model_version"], quiet["latency_ms"]) == ("blue", "3", 2.1)
    back = np.frombuffer(base64.b64decode(full["input_b64"]), "<f4").reshape(full["input_shape"])
    np.testing.assert_array_equal(back, rows)
    assert hashlib.sha256(base64.b64decode(full["input_b64"])).hexdigest() == full["input_sha256"]


def test_a_full_buffer_drops_and_counts_instead_of_waiting(redis_server):  # noqa: F811
    store = open_store(redis_server.url)
    observer = RecordingObserver()
    log = PredictionLog(store, WHO, max_records=5, observer=observer, flush_interval_s=0.05)
    row = np.zeros((1, 64), np.float32)
    offered = [log.offer(prediction(f"r{i}", row)) for i in range(12)]  # the writer is not running yet
    assert offered == [True] * 5 + [False] * 7
    log.start()
    wait_until(lambda: observer.written == 5 and observer.dropped["buffer_full"] == 7, 10, "the counts")
    log.close()
    assert redis_server.client().xlen("canary:predlog:stream") == 5


def test_the_buffer_is_bounded_in_bytes_too(redis_server):  # noqa: F811
    log = PredictionLog(open_store(redis_server.url), WHO, max_records=1000, max_bytes=100_000)
    big = np.zeros((64, 64), np.float32)  # 16 KiB each
    accepted = sum(log.offer(prediction(f"r{i}", big)) for i in range(20))
    assert accepted == 100_000 // (big.nbytes + 400)
    log.close()


def test_a_dead_sink_drops_batches_counts_them_and_warns_once(redis_server, caplog):  # noqa: F811
    observer = RecordingObserver()
    log = PredictionLog(open_store(redis_server.url, timeout_s=0.2), WHO, batch_size=10, observer=observer,
                        flush_interval_s=0.05)  # fmt: skip
    log.start()
    redis_server.kill()
    row = np.zeros((1, 64), np.float32)
    for i in range(50):
        assert log.offer(prediction(f"r{i}", row))
        time.sleep(0.002)  # spread over several writer cycles
    wait_until(lambda: observer.dropped["sink"] == 50, 20, "every record counted as dropped")
    log.close()
    assert observer.written == 0
    warnings = [r for r in caplog.records if "prediction log sink failing" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_row_fields_name_every_key_of_a_row_in_order():
    from service.core.predlog import ROW_FIELDS, LogIdentity, Prediction, to_row

    p = Prediction("r", 1.0, "rest", False, 0.001, np.zeros((1, 64), np.float32), "FP32", [0], [0.5])
    assert tuple(to_row(p, LogIdentity("blue", "digits", "1"), keep_inputs=True)) == ROW_FIELDS

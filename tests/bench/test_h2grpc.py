"""The C gRPC load generator (h2load): real calls against a real V2 gRPC server, every
answer accounted for by its gRPC status although h2load only sees HTTP's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.h2grpc import grpc_frame, h2load_duration, h2load_path, parse_h2load, run_h2load_grpc, shape
from bench.payloads import to_grpc
from service.core.faults import FaultPlan
from tests.service.v2.test_grpc import serving
from tests.support.tiny_model import digits_rows, tiny_core

RECORDED = """finished in 5.00s, 1229.60 req/s, 274.12KB/s
requests: 6148 total, 6180 started, 6148 done, 6148 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 6148 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.37MB (1434002) total, 18.60KB (19044) headers (space savings 96.18%), 672.44KB (688576) data
"""


def test_calls_whose_answer_carries_no_message_are_grpc_errors():
    rows = np.array([[0, 200, 1000], [0, 200, 3000], [0, -1, 0]], dtype=np.float64)  # -1: a failed stream
    clean = parse_h2load(RECORDED, rows, answer_bytes=112, duration_s=5.0)
    assert (clean.requests, clean.statuses, clean.errors) == (6148, {"OK": 6148}, 0)
    assert clean.p50_ms == pytest.approx(2.0)
    short = RECORDED.replace("(688576) data", f"({112 * 6000}) data")  # 148 answers without a message
    failed = parse_h2load(short, rows, answer_bytes=112, duration_s=5.0)
    assert failed.statuses == {"OK": 6000, "grpc-error": 148} and failed.errors == 148
    with pytest.raises(ValueError, match="not h2load output"):
        parse_h2load("connection refused", rows, 112, 5.0)


def test_the_frame_the_connection_shape_and_the_durations():
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert (h2load_duration(0.5), h2load_duration(10.0)) == ("500ms", "10000ms")  # h2load refuses "0.5"
    assert shape(32) == (8, 4) and shape(4) == (4, 1) and shape(1) == (1, 1)


@pytest.fixture(scope="module")
def h2load() -> str:
    path = h2load_path()
    assert path, "h2load is missing: run `make setup` (Debian package nghttp2-client)"
    return path


@pytest.mark.parametrize("error_ratio", [0.0, 0.25])
def test_real_load_counts_every_answer_by_its_grpc_status(h2load, tmp_path: Path, error_ratio):
    # the first answer is always OK: it is the size probe; then every 4th call fails (counted schedule)
    core = tiny_core(tmp_path, faults=FaultPlan(error_ratio=error_ratio, after_requests=1))
    with serving(lambda: core) as served:
        try:
            result = run_h2load_grpc(served.url, to_grpc(digits_rows(1)), tmp_path / "load", 1.0, 8, 0.5)
        finally:
            served.run(core.close())
    assert result.requests > 50 and result.loadgen_cpu_s > 0
    assert sum(result.statuses.values()) == result.requests
    assert result.errors / result.requests == pytest.approx(error_ratio, abs=0.02), result.statuses
    assert result.p50_ms > 0


def test_a_fixed_load_is_paced_by_h2load_at_the_offered_rate(h2load, tmp_path: Path):
    """The fixed-load rows' gRPC latencies come from h2load pacing `rate` calls/s over its
    connections, not from a closed loop: the count follows the rate, whatever the server could do."""
    core = tiny_core(tmp_path)
    with serving(lambda: core) as served:
        try:
            paced = run_h2load_grpc(served.url, to_grpc(digits_rows(1)), tmp_path / "paced", 2.0, 16, 0.0, rate=100.0)
            free = run_h2load_grpc(served.url, to_grpc(digits_rows(1)), tmp_path / "free", 2.0, 16, 0.0)
        finally:
            served.run(core.close())
    assert paced.statuses == {"OK": paced.requests}
    assert 170 <= paced.requests <= 230, paced.requests  # 100/s for 2 s
    assert free.requests > 3 * paced.requests  # the same server, unpaced
    assert 0 < paced.p50_ms <= paced.p99_ms

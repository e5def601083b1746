"""bench/cache_mix.py: the miss generator really sends a new input every request (real wrk
against a recording HTTP server), and the target judges hit p50 against miss p50."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench.cache_mix import DISTINCT_INPUTS, CacheMix, distinct_payload
from bench.payloads import sample_rows, to_v2_json
from bench.results import judge_targets
from bench.wrk import run_wrk
from tests.support.tools import require_tool


def test_every_miss_request_carries_an_input_no_other_request_had(tmp_path):
    require_tool("wrk", installs="wrk")
    bodies: list[bytes] = []
    lock = threading.Lock()

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = to_v2_json(sample_rows(1))
        result = run_wrk(f"http://127.0.0.1:{server.server_address[1]}/v2/models/digits/infer",
                         distinct_payload(base), tmp_path, 1, 2, lua_request=DISTINCT_INPUTS)  # fmt: skip
    finally:
        server.shutdown()
    assert result.requests >= 50 and result.errors == 0 and len(bodies) >= 50
    sent = [json.loads(b)["inputs"][0] for b in bodies]
    original = json.loads(base.body)["inputs"][0]["data"]
    pairs = [tuple(s["data"][:2]) for s in sent]
    assert len(set(pairs)) == len(pairs)  # no input twice
    assert all(0 <= v < 16 and float(v * 256).is_integer() for pair in pairs for v in pair)
    assert all(s["data"][2:] == original[2:] and s["shape"] == [1, 64] for s in sent)
    assert np.asarray(sent[0]["data"], np.float32).shape == (64,)


def mix(hit_p50: float, miss_p50: float) -> CacheMix:
    return CacheMix("digits-heavy", 3000.0, 900.0, hit_p50, miss_p50, 9.0, 30.0, 29_000, 10.0)


def test_the_target_wants_hits_at_a_third_of_the_misses_p50_or_less():
    (passed,) = [t for t in judge_targets([], [], None, mix(2.0, 9.0)) if t.name.startswith("cache hits next")]
    (failed,) = [t for t in judge_targets([], [], None, mix(4.0, 9.0)) if t.name.startswith("cache hits next")]
    (unmeasured,) = [t for t in judge_targets([], []) if t.name.startswith("cache hits next")]
    assert (passed.passed, failed.passed, unmeasured.passed) == (True, False, None)
    assert passed.value == pytest.approx(2 / 9) and "77%" in passed.detail

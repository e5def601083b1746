"""service/v2/http_server.py: the V2 REST listener's limits against clients that hold it.

The real listener (uvicorn + httptools) on a free port, serving the V2 app over the tiny
model from an event loop of its own; clients are raw sockets (what an attacker has) and
httpx (what a user has).
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from service.core.faults import FaultPlan
from service.core.inference import BatchingConfig
from service.core.observer import CoreObserver
from service.v2.rest import V2RestApp
from tests.support.tiny_model import digits_rows, tiny_core
from tests.support.v2_listener import listening

READ_TIMEOUT_S = 1.0
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> V2RestApp:
    return V2RestApp(8 << 20, tiny_core(tmp_path_factory.mktemp("http-model")))


def infer_body() -> dict:
    row = digits_rows(1)[0].tolist()
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset; anything it sent before is
    read and skipped), False when the socket's timeout passes with the connection open."""
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_trickling_connections_are_closed_and_real_requests_still_served(app):
    with listening(app, read_timeout_s=READ_TIMEOUT_S, max_connections=2048) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        half = []
        for _ in range(200):  # a request head that promises a body that never comes
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            half.append(sock)
        with httpx.Client(base_url=url, timeout=10) as client:
            answer = client.post(INFER, json=infer_body())  # served while 500 sockets sit there
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + READ_TIMEOUT_S + 10
        for sock in idle + half:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
        still_open = [sock for sock in idle + half if not closed_by_server(sock)]
        assert still_open == [], f"{len(still_open)} of 500 connections still open after the read timeout"
        for sock in idle + half:
            sock.close()
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post(INFER, json=infer_body()).status_code == 200


def test_a_keep_alive_connection_is_timed_out_on_its_second_request_too(app):
    with listening(app, read_timeout_s=READ_TIMEOUT_S) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(10)
            assert b" 200 " in sock.recv(4096)
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            sock.settimeout(READ_TIMEOUT_S + 10)
            assert closed_by_server(sock)


def test_beyond_the_connection_limit_the_listener_answers_503(app):
    with listening(app, max_connections=4) as url:
        port = int(url.rsplit(":", 1)[1])
        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        try:
            time.sleep(0.2)  # let the server accept them
            with httpx.Client(base_url=url, timeout=10) as client:
                assert client.get("/v2/health/live").status_code == 503
        finally:
            for sock in holders:
                sock.close()
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(50):  # the closed holders are released
                if client.get("/v2/health/live").status_code == 200:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the listener kept refusing after the connections were closed")


class CountingObserver(CoreObserver):
    def __init__(self) -> None:
        self.rows = 0

    def batch(self, rows: int, items: int, seconds: float) -> None:
        self.rows += rows


def test_a_client_that_disconnects_frees_its_queued_rows_and_costs_no_model_time(tmp_path):
    """20 clients send a request to a slow model (200 ms a batch, one request per batch) and
    hang up at once: their requests leave the queue instead of keeping the model busy for
    4 s, and the next client is answered."""
    observer = CountingObserver()
    core = tiny_core(tmp_path, batching=BatchingConfig(max_batch_size=1, max_latency_ms=0), observer=observer,
                     faults=FaultPlan(latency_ms=200))  # fmt: skip
    body = json.dumps(infer_body()).encode()
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with listening(V2RestApp(8 << 20, core)) as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head.encode() + body)
        time.sleep(0.5)  # the server notices the hang-ups
        assert core.batcher.queue_rows == 0
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post(INFER, json=infer_body()).status_code == 200
    assert observer.rows <= 5, f"the model ran {observer.rows} rows for clients that had left"


def test_each_answer_leaves_in_one_write_so_a_killed_worker_never_sends_half(app, monkeypatch):
    """Status line, headers and body of an answer go to the socket in one send: a worker
    killed between two sends left nginx headers without a body, a truncated 200 it cannot
    retry elsewhere (make chaos saw one). The server side's sends are recorded on the real
    socket, over two requests on one keep-alive connection: a 200 and a 400."""
    sends: list[bytes] = []
    real_send = socket.socket.send

    def recording_send(sock: socket.socket, data, *flags):
        if sock.getsockname()[1] == port:  # the listener's side of the connection
            sends.append(bytes(data))
        return real_send(sock, data, *flags)

    with listening(app) as url:
        port = int(url.rsplit(":", 1)[1])
        monkeypatch.setattr(socket.socket, "send", recording_send)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for body in (json.dumps(infer_body()).encode(), b'{"inputs": 1}'):
                head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                sock.sendall(head.encode() + body)
                answer = b""
                while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                    answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0]
                ):
                    answer += sock.recv(65536)
        monkeypatch.undo()
    assert [s.split(b"\r\n", 1)[0] for s in sends] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"], sends
    assert json.loads(sends[0].split(b"\r\n\r\n", 1)[1])["outputs"][0]["name"] == "logits"
    assert "error" in json.loads(sends[1].split(b"\r\n\r\n", 1)[1])

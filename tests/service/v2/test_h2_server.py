"""The lean gRPC server (service/v2/h2_server.py) at the HTTP/2 level: flow control, deadlines,
resets and hostile bytes, with a raw HTTP/2 client written here (hpack encodes its headers),
then tritonclient to show the server still answers correctly. The RPC-level behaviour (codes,
metadata, limits, health) is tests/service/v2/test_grpc.py's, run on both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
import urllib.parse
from typing import Any

import grpc
import hpack
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb2

from service.core.inference import BatchingConfig
from service.v2 import h2_server as h2
from tests.service.v2.test_grpc import (
    MAX_MESSAGE_BYTES,
    TIMEOUT,
    assert_answers,
    health_status,
    raw_request,
    serving,
    tin,
)
from tests.support.tiny_model import digits_rows, tiny_core

INFER = "/inference.GRPCInferenceService/ModelInfer"
CALL_HEAD = [(":method", "POST"), (":scheme", "http"), (":path", INFER), (":authority", "t"),
             ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return tiny_core(tmp_path_factory.mktemp("h2-model"), max_rows=64)


@pytest.fixture(scope="module")
def served(core):
    with serving(lambda: core, transport="lean") as running:
        yield running


class RawClient:
    """A bare HTTP/2 client: frames in, frames out, nothing hidden."""

    def __init__(self, url: str, settings_payload: bytes = b"") -> None:
        host, port = url.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        self.sock.sendall(h2.PREFACE + h2._frame(h2.SETTINGS, 0, 0, settings_payload))
        self.encoder, self.decoder, self.buffer = hpack.Encoder(), hpack.Decoder(), b""

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.sock.sendall(h2._frame(kind, flags, stream_id, payload))

    def call(self, stream_id: int, message: bytes, path: str = INFER, extra: tuple = ()) -> None:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "test"),
                   ("content-type", "application/grpc"), ("te", "trailers"), *extra]  # fmt: skip
        self.send(h2.HEADERS, h2.END_HEADERS, stream_id, self.encoder.encode(headers))
        self.send(h2.DATA, h2.END_STREAM, stream_id, framed(message))

    def frame(self, timeout: float = TIMEOUT) -> tuple[int, int, int, bytes] | None:
        """The next frame, or None when the server closed the connection."""
        self.sock.settimeout(timeout)
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        length = int.from_bytes(self.buffer[:3], "big")
        kind, flags, stream_id = self.buffer[3], self.buffer[4], int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
        payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
        return kind, flags, stream_id, payload

    def answer(self, stream_id: int, window_updates: bool = False) -> dict[str, Any]:
        """Read until `stream_id` ends: its headers, DATA payloads and trailers."""
        got: dict[str, Any] = {"headers": [], "data": [], "frames": []}
        while True:
            frame = self.frame()
            assert frame is not None, f"connection closed before stream {stream_id} ended: {got}"
            kind, flags, sid, payload = frame
            if kind == h2.SETTINGS and not flags & h2.ACK:
                self.send(h2.SETTINGS, h2.ACK, 0)
            if sid != stream_id:
                continue
            got["frames"].append((kind, len(payload)))
            if kind in (h2.HEADERS, h2.CONTINUATION):  # a header block may span CONTINUATIONs
                if kind == h2.HEADERS:
                    block, ending = payload, flags & h2.END_STREAM
                else:
                    block += payload
                if flags & h2.END_HEADERS:
                    got["headers"].append(dict(self.decoder.decode(block)))
                    if ending:
                        return got
                continue
            if kind == h2.DATA:
                got["data"].append(payload)
                if window_updates:  # give back exactly what was used, on the stream and the connection
                    for target in (stream_id, 0):
                        self.send(h2.WINDOW_UPDATE, 0, target, struct.pack(">I", len(payload)))
            elif kind == h2.RST_STREAM:
                got["reset"] = struct.unpack(">I", payload)[0]
                return got
            if flags & h2.END_STREAM:
                return got

    def goaway(self) -> int | None:
        """The error code of the server's GOAWAY (None if it closed without one)."""
        while (frame := self.frame()) is not None:
            if frame[0] == h2.GOAWAY:
                return struct.unpack(">II", frame[3][:8])[1]
        return None


def grpc_status(answer: dict[str, Any]) -> str:
    return answer["headers"][-1].get("grpc-status", "")


def test_an_answer_waits_for_the_clients_window_and_respects_its_frame_size(served, core):
    """A client allowing 16 bytes in flight gets the answer 16 bytes at a time, each after its
    window update, and the reassembled message is the model's answer."""
    rows = digits_rows(8, seed=3)
    client = RawClient(served.url, struct.pack(">HI", h2.S_INITIAL_WINDOW_SIZE, 16))
    try:
        client.call(1, raw_request(rows).SerializeToString())
        answer = client.answer(1, window_updates=True)
    finally:
        client.close()
    data = [size for kind, size in answer["frames"] if kind == h2.DATA]
    assert max(data) <= 16 and len(data) > 10, data
    assert_model_answer(answer, core, rows)


class HoldingCore:
    """The tiny core, except that a request of `hold_rows` rows waits (30 s) until cancelled;
    `held` lists those requests, `cancelled` is set when one is cancelled."""

    def __init__(self, core: Any, hold_rows: int) -> None:
        self.card, self.ready, self.max_input_elements = core.card, True, core.max_input_elements
        self._core, self._hold_rows = core, hold_rows
        self.held: list[Any] = []
        self.cancelled = threading.Event()

    def is_ready(self) -> bool:
        return True

    def check_model(self, name: str, version: str | None = None) -> None:
        pass

    async def infer(self, request: Any, trace: Any = None) -> Any:
        if request.inputs[0].shape[0] == self._hold_rows:
            self.held.append(request)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return await self._core.infer(request, trace)


def test_grpc_timeout_is_enforced_by_the_server_and_the_call_is_cancelled(core):
    slow = HoldingCore(core, hold_rows=1)
    with serving(lambda: slow, transport="lean") as running:
        client = RawClient(running.url)
        try:
            started = time.monotonic()
            client.call(1, raw_request(digits_rows(1)).SerializeToString(), extra=(("grpc-timeout", "300m"),))
            answer = client.answer(1)
        finally:
            client.close()
    assert grpc_status(answer) == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]), answer["headers"]
    assert time.monotonic() - started < 10 and slow.cancelled.wait(TIMEOUT)


def test_a_reset_call_gives_its_place_back(core):
    """With one call allowed in flight, a held call the client resets is cancelled on the
    server, and the next call is answered instead of refused RESOURCE_EXHAUSTED."""
    holding = HoldingCore(core, hold_rows=2)
    with serving(lambda: holding, max_concurrent_rpcs=1, transport="lean") as running:
        raw = RawClient(running.url)
        client = triton.InferenceServerClient(running.url)
        try:
            raw.call(1, raw_request(digits_rows(2)).SerializeToString())
            time.sleep(0.3)  # the call is in flight
            # a second end of stream (trailers) on the same stream starts no second call
            raw.send(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, raw.encoder.encode([("x-late", "1")]))
            on_stream_1 = []
            with contextlib.suppress(TimeoutError):
                while (frame := raw.frame(timeout=0.3)) is not None:
                    on_stream_1 += [frame] if frame[2] == 1 else []
            assert len(holding.held) == 1 and on_stream_1 == [] and not holding.cancelled.is_set(), on_stream_1
            with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
                client.infer("digits", [tin(digits_rows(1))], client_timeout=TIMEOUT)
            raw.send(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.CANCEL))
            assert holding.cancelled.wait(TIMEOUT)
            assert_answers(client, core, n=1)
        finally:
            raw.close()
            client.close()


LARGE_ROWS = 976  # 976 x 64 FP32 = 249,856 bytes: under the 256 KiB message limit; 5 of them pass 4 x it


@pytest.fixture(scope="module")
def large_core(tmp_path_factory):
    """Takes calls of LARGE_ROWS rows, 64 at once."""
    return tiny_core(tmp_path_factory.mktemp("h2-large"), max_rows=1024,
                     batching=BatchingConfig(max_batch_size=1024, max_queue_rows=1 << 17))  # fmt: skip


def test_many_large_calls_on_one_channel_all_end_answered_or_refused(large_core):
    """64 calls of ~250 KB at once over one channel (grpcio interleaves their bodies): every
    call ends well before its deadline, with the model's answer or RESOURCE_EXHAUSTED naming
    the per-connection limit. (Withholding the connection window at the limit left 25 of
    them half-sent until DEADLINE_EXCEEDED.)"""
    rows = digits_rows(LARGE_ROWS, seed=5)
    want = large_core.runner.run({"input": rows}, ["logits"])[0]
    with serving(lambda: large_core, transport="lean") as running:
        client = triton.InferenceServerClient(running.url)
        outcomes: list[str] = []

        def call() -> None:
            try:
                got = client.infer("digits", [tin(rows)], client_timeout=TIMEOUT, parameters={"cache": False})
                np.testing.assert_allclose(got.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
                outcomes.append("answered")
            except triton.InferenceServerException as exc:
                outcomes.append(f"{exc.status()} {exc.message()}")

        for _ in range(3):  # grpcio's interleaving varies: one round of 64 left calls stuck 1 time in 3
            threads = [threading.Thread(target=call) for _ in range(64)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        client.close()
    refused = [o for o in outcomes if o != "answered"]
    assert len(outcomes) == 3 * 64 and outcomes.count("answered") >= 12, outcomes
    assert all("RESOURCE_EXHAUSTED" in o and str(4 * MAX_MESSAGE_BYTES) in o for o in refused), refused


def test_unfinished_bodies_over_the_connection_cap_refuse_the_newest_call_only(large_core):
    """A client sends five ~250 KB calls but holds back each one's last bytes: the fifth pushes
    what the connection buffers past 4 x the message limit, and that call (the newest) is
    answered RESOURCE_EXHAUSTED; the four older ones, finished afterwards, get the model's answer."""
    rows = digits_rows(LARGE_ROWS, seed=6)
    body = framed(raw_request(rows).SerializeToString())
    with serving(lambda: large_core, transport="lean") as running:
        client = RawClient(running.url)
        try:
            streams = [1, 3, 5, 7, 9]
            _partial_calls(client, streams, body)
            refused = client.answer(9)
            assert grpc_status(refused) == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), refused["headers"]
            assert str(4 * MAX_MESSAGE_BYTES) in urllib.parse.unquote(refused["headers"][-1]["grpc-message"])
            for stream_id in streams[:-1]:
                client.send(h2.DATA, h2.END_STREAM, stream_id, body[-100:])
                assert_model_answer(client.answer(stream_id, window_updates=True), large_core, rows)
        finally:
            client.close()


def _partial_calls(client: RawClient, stream_ids: list[int], body: bytes) -> None:
    """Open a call on each stream and send all of `body` but its last 100 bytes."""
    for stream_id in stream_ids:
        client.send(h2.HEADERS, h2.END_HEADERS, stream_id, client.encoder.encode(CALL_HEAD))
        for start in range(0, len(body) - 100, h2.FRAME_MAX):
            client.send(h2.DATA, 0, stream_id, body[start : min(start + h2.FRAME_MAX, len(body) - 100)])


def test_unfinished_bodies_over_the_servers_cap_refuse_the_newest_call_of_the_sender(large_core, monkeypatch):
    """Two connections, each under its own cap: when the second one's fourth unfinished ~250 KB
    body takes what all connections hold past the server's cap (6 x the message limit here),
    that call is answered RESOURCE_EXHAUSTED naming the server's limit; the six other calls,
    finished afterwards, get the model's answer."""
    monkeypatch.setattr(h2, "HELD_TOTAL_MESSAGES", 6)
    rows = digits_rows(LARGE_ROWS, seed=7)
    body = framed(raw_request(rows).SerializeToString())
    with serving(lambda: large_core, transport="lean") as running:
        first, second = RawClient(running.url), RawClient(running.url)
        try:
            _partial_calls(first, [1, 3, 5], body)
            first.sock.sendall(h2._frame(h2.PING, 0, 0, b"12345678"))  # its bodies are in once PING is answered
            while (frame := first.frame()) is not None and frame[0] != h2.PING:
                pass
            _partial_calls(second, [1, 3, 5, 7], body)
            refused = second.answer(7)
            assert grpc_status(refused) == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), refused["headers"]
            details = urllib.parse.unquote(refused["headers"][-1]["grpc-message"])
            assert "the server's" in details and str(6 * MAX_MESSAGE_BYTES) in details, details
            for client in (first, second):
                for stream_id in (1, 3, 5):
                    client.send(h2.DATA, h2.END_STREAM, stream_id, body[-100:])
                    assert_model_answer(client.answer(stream_id, window_updates=True), large_core, rows)
        finally:
            first.close()
            second.close()


def test_an_upload_that_stalls_without_a_grpc_timeout_is_answered_and_forgotten(served, core, monkeypatch):
    """A call without grpc-timeout whose body stops arriving is answered DEADLINE_EXCEEDED
    UPLOAD_TIMEOUT_S after its headers (0.5 s here), its buffered body dropped, and the same
    connection still gets answers."""
    monkeypatch.setattr(h2, "UPLOAD_TIMEOUT_S", 0.5)
    client = RawClient(served.url)
    try:
        message = raw_request(digits_rows(2, seed=8)).SerializeToString()
        client.send(h2.HEADERS, h2.END_HEADERS, 1, client.encoder.encode(CALL_HEAD))
        client.send(h2.DATA, 0, 1, framed(message)[:200])
        answer = client.answer(1)
        assert grpc_status(answer) == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]), answer["headers"]
        assert "did not arrive within 0.5 s" in urllib.parse.unquote(answer["headers"][-1]["grpc-message"])
        assert served.run(_held(served.endpoint)) == (0, 0)
        client.call(3, raw_request(digits_rows(2, seed=8)).SerializeToString())
        assert_model_answer(client.answer(3), core, digits_rows(2, seed=8))
    finally:
        client.close()


def _overflowing_initial_window(client: RawClient) -> None:
    """A call left open, its window raised by 1,000, then an initial window of 2^31-1."""
    client.send(h2.HEADERS, h2.END_HEADERS, 1, client.encoder.encode(CALL_HEAD))
    client.send(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000))
    client.send(h2.SETTINGS, 0, 0, struct.pack(">HI", h2.S_INITIAL_WINDOW_SIZE, h2.MAX_WINDOW))


@pytest.mark.parametrize(
    ("what", "send", "code"),
    [
        ("a frame over 16 KiB", lambda c: c.send(0xFA, 0, 0, b"x" * 20000), h2.FRAME_SIZE_ERROR),
        ("undecodable HPACK", lambda c: c.send(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), h2.COMPRESSION_ERROR),
        ("DATA on an idle stream", lambda c: c.send(h2.DATA, 0, 7, b"abc"), h2.PROTOCOL_ERROR),
        ("HEADERS on stream 0", lambda c: c.send(h2.HEADERS, h2.END_HEADERS, 0, b"\x82"), h2.PROTOCOL_ERROR),
        ("a client's push", lambda c: c.send(h2.PUSH_PROMISE, 0, 1, b"\x00\x00\x00\x02"), h2.PROTOCOL_ERROR),
        ("an interrupted header block", lambda c: (c.send(h2.HEADERS, 0, 1, b"\x82"), c.send(h2.PING, 0, 0, b"x" * 8)),
         h2.PROTOCOL_ERROR),
        ("a bad PING", lambda c: c.send(h2.PING, 0, 0, b"abc"), h2.FRAME_SIZE_ERROR),
        ("a connection window update of 0", lambda c: c.send(h2.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), h2.PROTOCOL_ERROR),
        ("an initial window pushing a stream's past 2^31-1", _overflowing_initial_window, h2.FLOW_CONTROL_ERROR),
    ],
)  # fmt: skip
def test_protocol_violations_close_the_connection_with_goaway_and_nothing_else(served, core, what, send, code):
    client = RawClient(served.url)
    try:
        send(client)
        assert client.goaway() == code, what
    finally:
        client.close()
    assert_answers(triton.InferenceServerClient(served.url), core)


@pytest.mark.parametrize(
    "opening", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
)
def test_http1_and_tls_openings_are_closed(served, core, opening):
    with socket.create_connection(served.url.rsplit(":", 1)) as sock:  # type: ignore[arg-type]
        sock.settimeout(TIMEOUT)
        sock.sendall(opening)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert b"HTTP/1.1 200" not in received  # closed, never answered as if it were a call
    assert_answers(triton.InferenceServerClient(served.url), core)


def test_a_streaming_rpc_and_an_unknown_method_are_unimplemented(served):
    client = RawClient(served.url)
    try:
        client.call(1, b"", path="/grpc.health.v1.Health/Watch")
        assert grpc_status(client.answer(1)) == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
        client.call(3, b"", path="/no.Such/Method")
        assert grpc_status(client.answer(3)) == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    finally:
        client.close()


def test_a_compressed_message_is_unimplemented_and_a_broken_one_internal(served):
    client = RawClient(served.url)
    try:
        message = raw_request(digits_rows(1)).SerializeToString()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", INFER), (":authority", "t"),
                   ("content-type", "application/grpc"), ("grpc-encoding", "gzip")]  # fmt: skip
        client.send(h2.HEADERS, h2.END_HEADERS, 1, client.encoder.encode(headers))
        client.send(h2.DATA, h2.END_STREAM, 1, b"\x01" + struct.pack(">I", len(message)) + message)
        assert grpc_status(client.answer(1)) == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
        client.send(h2.HEADERS, h2.END_HEADERS, 3, client.encoder.encode(headers[:5]))
        client.send(h2.DATA, h2.END_STREAM, 3, b"\x00\x00\x00\x00\x09abc")  # declares 9 bytes, holds 3
        assert grpc_status(client.answer(3)) == str(grpc.StatusCode.INTERNAL.value[0])
    finally:
        client.close()


def test_the_lean_server_runs_on_uvloop_as_in_the_bento(core):
    import uvloop  # a dependency of the project (pyproject.toml), as in the Bento

    with serving(lambda: core, transport="lean", loop_factory=uvloop.new_event_loop) as running:
        client = triton.InferenceServerClient(running.url)
        assert_answers(client, core, n=5)
        assert health_status(running.url, "") == health_pb2.HealthCheckResponse.SERVING
        client.close()


def test_grpcio_the_other_server_answers_the_same(core):
    with serving(lambda: core, transport="grpcio") as running:
        client = triton.InferenceServerClient(running.url)
        assert_answers(client, core, n=4)
        assert health_status(running.url, "inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING
        client.close()


def test_a_timeout_header_parses_as_grpc_defines_it():
    assert h2.parse_timeout("100m") == pytest.approx(0.1)
    assert h2.parse_timeout("5S") == 5.0 and h2.parse_timeout("2H") == 7200.0
    assert [h2.parse_timeout(v) for v in ("", "m", "12", "1x", "-1S", "１S", "1234567890S")] == [None] * 7


_FRAME = st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 9), st.binary(max_size=64)).map(
    lambda f: h2._frame(f[0], f[1], f[2], f[3])
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_FRAME, max_size=6))
def test_random_frames_never_break_the_server(served, frames):
    """Whatever frames a client sends after the preface, the server answers, resets or closes
    that connection only: a fresh client is answered right after."""
    client = RawClient(served.url)
    try:
        client.sock.sendall(b"".join(frames))
        client.sock.settimeout(0.2)
        with contextlib.suppress(OSError):  # a timeout (nothing more to read) or a reset
            while client.sock.recv(65536):
                pass
    finally:
        client.close()
    with grpc.insecure_channel(served.url) as channel:
        stub = channel.unary_unary(INFER)
        assert pb2.ModelInferResponse.FromString(stub(raw_request(digits_rows(1)).SerializeToString(), timeout=TIMEOUT))


HEAD = [(":method", "POST"), (":scheme", "http"), (":path", INFER), (":authority", "t"),
        ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip


def framed(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def assert_model_answer(answer: dict[str, Any], core: Any, rows: np.ndarray) -> None:
    assert grpc_status(answer) == "0", answer
    got = pb2.ModelInferResponse.FromString(b"".join(answer["data"])[5:])
    np.testing.assert_allclose(np.frombuffer(got.raw_output_contents[0], "<f4").reshape(-1, 10),
                               core.runner.run({"input": rows}, ["logits"])[0], rtol=1e-5, atol=1e-5)  # fmt: skip


def test_stop_lets_a_call_still_uploading_and_an_answer_waiting_for_window_finish_within_grace(core):
    """stop(grace)'s GOAWAY promises to process streams up to its last id: a call whose body is
    still arriving and an answer waiting for the client's window both complete within the
    grace (before, only calls with a running handler were waited for; these two were cut)."""
    rows = digits_rows(4, seed=8)
    body = framed(raw_request(rows).SerializeToString())
    with serving(lambda: core, transport="lean") as running:
        uploading = RawClient(running.url)
        waiting = RawClient(running.url, struct.pack(">HI", h2.S_INITIAL_WINDOW_SIZE, 16))
        try:
            uploading.send(h2.HEADERS, h2.END_HEADERS, 1, uploading.encoder.encode(HEAD))
            uploading.send(h2.DATA, 0, 1, body[:10])
            waiting.call(1, raw_request(rows).SerializeToString())
            first = waiting.frame()
            while first is not None and not (first[0] == h2.DATA and first[2] == 1):  # the answer has begun
                first = waiting.frame()
            assert first is not None and len(first[3]) == 16
            stopping = asyncio.run_coroutine_threadsafe(running.endpoint.server.stop(10.0), running.loop)
            time.sleep(0.3)
            uploading.send(h2.DATA, h2.END_STREAM, 1, body[10:])
            assert_model_answer(uploading.answer(1), core, rows)
            waiting.send(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 20))
            rest = waiting.answer(1)
            rest["data"].insert(0, first[3])
            assert_model_answer(rest, core, rows)
            for client in (uploading, waiting):  # then the server closes the connections
                with contextlib.suppress(OSError):
                    while client.frame() is not None:
                        pass
            stopping.result(TIMEOUT)
        finally:
            uploading.close()
            waiting.close()


class _FakeTransport:
    def __init__(self) -> None:
        self.out, self.closed = bytearray(), False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """The frames written since the last call."""
        pos, got = 0, []
        while pos < len(self.out):
            n = int.from_bytes(self.out[pos : pos + 3], "big")
            sid = int.from_bytes(self.out[pos + 5 : pos + 9], "big")
            got.append((self.out[pos + 3], self.out[pos + 4], sid, bytes(self.out[pos + 9 : pos + 9 + n])))
            pos += 9 + n
        self.out.clear()
        return got


class _Bytes:
    """A protobuf-like message: its bytes as they are."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def FromString(cls, data: bytes) -> _Bytes:  # noqa: N802 - protobuf's name
        return cls(data)

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        return self.data


def _connect(handler: Any, settings_payload: bytes = b"") -> tuple[Any, _FakeTransport, hpack.Encoder]:
    """A connection of a server whose one method "/t/T" is `handler`, on a fake transport."""
    server = h2.H2GrpcServer({"/t/T": h2.UnaryMethod(handler, _Bytes)}, 16 << 20, None)
    connection, transport = h2._Connection(server), _FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(h2.PREFACE + h2._frame(h2.SETTINGS, 0, 0, settings_payload))
    transport.frames()
    return connection, transport, hpack.Encoder()


def _call_frames(encoder: hpack.Encoder, stream_id: int, message: bytes) -> bytes:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/t/T"), (":authority", "t"),
               ("content-type", "application/grpc")]  # fmt: skip
    return h2._frame(h2.HEADERS, h2.END_HEADERS, stream_id, encoder.encode(headers)) + h2._frame(
        h2.DATA, h2.END_STREAM, stream_id, framed(message)
    )


def test_an_answer_waiting_for_window_is_sent_from_one_buffer_not_copied_per_frame():
    """Structural check of the linear send (no timing): an 8 MiB answer waiting for window is
    kept as one buffer while it goes out, 1 byte per WINDOW_UPDATE (before, each DATA frame
    copied the rest of the answer: quadratic, ~0.6 ms of loop per 13-byte WINDOW_UPDATE), and
    once the window is large it arrives whole, in frames of at most 16 KiB, then its trailers."""
    answer = bytes(range(256)) * (8 << 12)  # 8 MiB

    async def big(request: Any, context: Any) -> _Bytes:
        return _Bytes(answer)

    async def run() -> None:
        connection, transport, encoder = _connect(big, struct.pack(">HI", h2.S_INITIAL_WINDOW_SIZE, 0))
        connection.data_received(_call_frames(encoder, 1, b"hi"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert [(kind, sid) for kind, _, sid, _ in transport.frames()] == [(h2.HEADERS, 1)]

        def buffer() -> Any:  # the largest object the waiting answer is kept in
            parts, found = [connection.streams[1].pending], []
            while parts:
                part = parts.pop()
                if isinstance(part, (list, tuple)):
                    parts += part
                elif isinstance(part, (bytes, bytearray, memoryview)):
                    found.append(part)
            return max(found, key=len)

        kept = buffer()
        data = []
        for _ in range(50):
            connection.data_received(h2._frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1)))
            data += [payload for kind, _, _, payload in transport.frames() if kind == h2.DATA]
            assert buffer() is kept
        assert data == [bytes([b]) for b in framed(answer)[:50]]
        grant = struct.pack(">I", 1 << 30)
        connection.data_received(h2._frame(h2.WINDOW_UPDATE, 0, 1, grant) + h2._frame(h2.WINDOW_UPDATE, 0, 0, grant))
        frames = transport.frames()
        assert max(len(payload) for kind, _, _, payload in frames if kind == h2.DATA) <= h2.FRAME_MAX
        got = b"".join(data) + b"".join(payload for kind, _, _, payload in frames if kind == h2.DATA)
        assert got == framed(answer)
        assert frames[-1][0] == h2.HEADERS and frames[-1][1] & h2.END_STREAM and connection.streams == {}

    asyncio.run(run())


def test_a_client_that_never_reads_is_not_read_either(served, core):
    """A client PINGs without reading: once the server's write buffer is full it stops reading
    that connection (before, it answered every PING into an ever-growing buffer: 20 MB from
    24 MB of PINGs), so the client's sends block; once it reads, every PING is acknowledged and
    a call on the same connection is answered."""
    client = RawClient(served.url)
    ping = h2._frame(h2.PING, 0, 0, b"12345678")
    pings = ping * 4096
    sent = 0
    try:
        client.sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError):  # blocked for a second: the server stopped reading
            while sent < 64 << 20:
                sent += client.sock.send(pings[sent % len(pings) :])
        assert sent < 64 << 20, "the server kept reading a client that never reads"
        assert max(served.run(_write_buffers(served.endpoint))) < 1 << 20
        client.sock.settimeout(TIMEOUT)
        received, pos, acked = bytearray(), 0, 0
        while acked < sent // len(ping):  # every PING fully sent is acknowledged
            chunk = client.sock.recv(1 << 20)
            assert chunk, f"closed after {acked} PING ACKs"
            received += chunk
            while len(received) - pos >= 9 and len(received) - pos >= 9 + int.from_bytes(
                received[pos : pos + 3], "big"
            ):
                acked += received[pos + 3] == h2.PING and received[pos + 4] == h2.ACK
                pos += 9 + int.from_bytes(received[pos : pos + 3], "big")
        client.buffer = bytes(received[pos:])
        client.sock.sendall(ping[sent % len(ping) :] if sent % len(ping) else b"")
        client.call(1, raw_request(digits_rows(2, seed=1)).SerializeToString())
        assert_model_answer(client.answer(1), core, digits_rows(2, seed=1))
    finally:
        client.close()


async def _write_buffers(endpoint: Any) -> list[int]:
    return [c.transport.get_write_buffer_size() for c in endpoint.server.connections]


def test_a_reset_call_stops_counting_in_flight_at_once_and_only_once(core):
    """Rapid reset: 20 calls, each reset right after its end of stream, then a real call, all in
    one write, with 2 calls allowed in flight: the real call is answered (before, the reset calls
    still counted until a later loop turn, and it was refused RESOURCE_EXHAUSTED). None is
    counted down twice: two held calls still fill the two places and a third is refused."""
    holding = HoldingCore(core, hold_rows=2)
    with serving(lambda: holding, max_concurrent_rpcs=2, transport="lean") as running:
        client = RawClient(running.url)
        try:
            frames = []
            for stream_id in range(1, 41, 2):
                frames += [h2._frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream_id, client.encoder.encode(HEAD)),
                           h2._frame(h2.RST_STREAM, 0, stream_id, struct.pack(">I", h2.CANCEL))]  # fmt: skip
            message = raw_request(digits_rows(1, seed=2)).SerializeToString()
            frames += [h2._frame(h2.HEADERS, h2.END_HEADERS, 41, client.encoder.encode(HEAD)),
                       h2._frame(h2.DATA, h2.END_STREAM, 41, framed(message))]  # fmt: skip
            client.sock.sendall(b"".join(frames))
            assert_model_answer(client.answer(41), core, digits_rows(1, seed=2))
            client.call(43, raw_request(digits_rows(2)).SerializeToString())
            client.call(45, raw_request(digits_rows(2)).SerializeToString())
            deadline = time.monotonic() + TIMEOUT
            while len(holding.held) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            client.call(47, message)
            assert grpc_status(client.answer(47)) == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        finally:
            client.close()


def test_header_blocks_are_split_into_frames_of_the_peers_size():
    """Trailers of ~45 KB (the servicer's trailing metadata) leave as HEADERS + CONTINUATION
    frames of at most 16 KiB, END_STREAM on the HEADERS and END_HEADERS on the last one (before:
    one 45 KB HEADERS frame, which nghttp2 and Go reject with FRAME_SIZE_ERROR)."""
    trailing = tuple((f"x-big-{i}", str(i) * 15000) for i in range(3))

    async def chatty(request: Any, context: Any) -> _Bytes:
        context.set_trailing_metadata(trailing)
        return request

    async def run() -> None:
        connection, transport, encoder = _connect(chatty)
        connection.data_received(_call_frames(encoder, 1, b"hi"))
        for _ in range(3):
            await asyncio.sleep(0)
        frames = transport.frames()
        assert all(len(payload) <= h2.FRAME_MAX for *_, payload in frames), [len(f[3]) for f in frames]
        kinds = [(kind, flags) for kind, flags, _, _ in frames]
        assert kinds == [(h2.HEADERS, h2.END_HEADERS), (h2.DATA, 0), (h2.HEADERS, h2.END_STREAM),
                         (h2.CONTINUATION, 0), (h2.CONTINUATION, h2.END_HEADERS)], kinds  # fmt: skip
        decoder = hpack.Decoder()
        decoder.max_header_list_size = 1 << 20
        assert decoder.decode(frames[0][3]) == [(":status", "200"), ("content-type", "application/grpc")]
        assert decoder.decode(b"".join(f[3] for f in frames[2:])) == [("grpc-status", "0"), *trailing]

    asyncio.run(run())


def test_a_long_status_message_is_cut_to_a_few_kib(served, core):
    """ModelReady for a 20,000-character model name: NOT_FOUND, its message cut to
    MAX_DETAILS characters, every frame within 16 KiB (before: one 20 KB trailers frame)."""
    client = RawClient(served.url)
    try:
        body = framed(pb2.ModelReadyRequest(name="x" * 20000).SerializeToString())
        headers = [(k, v if k != ":path" else "/inference.GRPCInferenceService/ModelReady") for k, v in HEAD]
        client.send(h2.HEADERS, h2.END_HEADERS, 1, client.encoder.encode(headers))
        client.send(h2.DATA, 0, 1, body[:16000])
        client.send(h2.DATA, h2.END_STREAM, 1, body[16000:])
        answer = client.answer(1)
    finally:
        client.close()
    assert all(size <= h2.FRAME_MAX for _, size in answer["frames"]), answer["frames"]
    assert grpc_status(answer) == str(grpc.StatusCode.NOT_FOUND.value[0]), answer["headers"]
    details = urllib.parse.unquote(answer["headers"][-1]["grpc-message"])
    assert len(details) == h2.MAX_DETAILS and "xxxx" in details, details[:100]
    assert_answers(triton.InferenceServerClient(served.url), core)


def test_after_the_client_changes_its_header_table_size_the_next_block_starts_with_a_size_update(served):
    """RFC 7541 4.2: after SETTINGS_HEADER_TABLE_SIZE (0 here, as `nghttp -c 0` sends), the first
    header block the server writes starts with a dynamic table size update to 0 (0x20); later
    blocks do not. (Before, none did, and nghttp2 closed the connection: COMPRESSION_ERROR.)"""
    client = RawClient(served.url, struct.pack(">HI", h2.S_HEADER_TABLE_SIZE, 0))
    try:
        blocks = []
        for stream_id in (1, 3):
            client.call(stream_id, raw_request(digits_rows(1)).SerializeToString())
            while (frame := client.frame()) is not None:
                if frame[0] == h2.SETTINGS and not frame[1] & h2.ACK:
                    client.send(h2.SETTINGS, h2.ACK, 0)
                if frame[0] == h2.HEADERS and frame[2] == stream_id:
                    blocks.append(frame[3])
                    if frame[1] & h2.END_STREAM:
                        break
    finally:
        client.close()
    assert [block[:1] == b"\x20" for block in blocks] == [True, False, False, False], blocks
    decoder = hpack.Decoder()
    assert [dict(decoder.decode(block)).get("grpc-status") for block in blocks] == [None, "0", None, "0"]


def test_a_stalled_upload_expires_with_its_deadline_and_is_forgotten(served, core):
    """grpc-timeout runs from the request's headers: a call whose body stops arriving is answered
    DEADLINE_EXCEEDED (and RST_STREAM NO_ERROR, as it was still sending) and its body dropped;
    the connection goes on serving. (Before, the timer started only at the end of the body.)"""
    body = framed(raw_request(digits_rows(4)).SerializeToString())
    client = RawClient(served.url)
    try:
        client.send(h2.HEADERS, h2.END_HEADERS, 1, client.encoder.encode([*HEAD, ("grpc-timeout", "300m")]))
        client.send(h2.DATA, 0, 1, body[:100])
        answer = client.answer(1)
        assert grpc_status(answer) == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]), answer["headers"]
        assert client.answer(1).get("reset") == h2.NO_ERROR
        assert served.run(_held(served.endpoint)) == (0, 0)
        client.send(h2.DATA, h2.END_STREAM, 1, body[100:])  # too late: dropped
        client.call(3, raw_request(digits_rows(2, seed=4)).SerializeToString())
        assert_model_answer(client.answer(3), core, digits_rows(2, seed=4))
    finally:
        client.close()


async def _held(endpoint: Any) -> tuple[int, int]:
    """Request bytes buffered and streams open, over the server's connections."""
    connections = endpoint.server.connections
    return sum(c.held for c in connections), sum(len(c.streams) for c in connections)


def test_after_the_clients_goaway_resetting_its_last_call_closes_the_connection(core):
    holding = HoldingCore(core, hold_rows=2)
    with serving(lambda: holding, transport="lean") as running:
        client = RawClient(running.url)
        try:
            client.call(1, raw_request(digits_rows(2)).SerializeToString())
            deadline = time.monotonic() + TIMEOUT
            while not holding.held and time.monotonic() < deadline:
                time.sleep(0.02)
            client.send(h2.GOAWAY, 0, 0, struct.pack(">II", 0, h2.NO_ERROR))
            client.send(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.CANCEL))
            assert holding.cancelled.wait(TIMEOUT)
            with contextlib.suppress(ConnectionResetError):
                while (frame := client.frame(timeout=5)) is not None:
                    assert frame[2] != 1, frame  # nothing more on the reset stream
        finally:
            client.close()


def test_oversized_metadata_refuses_only_its_call(served, core):
    """A call with 20 KB of metadata is answered RESOURCE_EXHAUSTED, as grpc.aio does; another
    call still uploading on the same connection and the next ones are answered (before, the
    whole connection got GOAWAY, failing every call on it). The big header also emptied the
    client's HPACK table: the next blocks decode, so the server's HPACK state followed it."""
    rows = digits_rows(3, seed=9)
    body = framed(raw_request(rows).SerializeToString())
    client = RawClient(served.url)
    try:
        client.send(h2.HEADERS, h2.END_HEADERS, 1, client.encoder.encode(HEAD))
        client.send(h2.DATA, 0, 1, body[:50])
        block = client.encoder.encode([*HEAD, ("x-big", "v" * 20000)])
        client.send(h2.HEADERS, 0, 3, block[: h2.FRAME_MAX])
        client.send(h2.CONTINUATION, h2.END_HEADERS, 3, block[h2.FRAME_MAX :])
        client.send(h2.DATA, h2.END_STREAM, 3, body)
        refused = client.answer(3)
        assert grpc_status(refused) == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), refused["headers"]
        client.send(h2.DATA, h2.END_STREAM, 1, body[50:])
        assert_model_answer(client.answer(1), core, rows)
        client.call(5, raw_request(rows).SerializeToString(), extra=(("x-small", "v"),))
        assert_model_answer(client.answer(5), core, rows)
    finally:
        client.close()
    with grpc.insecure_channel(served.url) as channel:
        infer = channel.unary_unary(INFER)
        with pytest.raises(grpc.RpcError) as refused_call:
            infer(raw_request(rows).SerializeToString(), timeout=TIMEOUT, metadata=(("x-big", "v" * 20000),))
        assert refused_call.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert pb2.ModelInferResponse.FromString(infer(raw_request(rows).SerializeToString(), timeout=TIMEOUT))

"""A lean HTTP/2 server for unary gRPC calls, in the worker's asyncio loop.

Why: grpcio's `grpc.aio` server costs ~260 us of CPU per call before any handler runs (a
poller thread, a hand-off to the loop, C-core call objects; `make bench`'s grpc-ceiling row),
which left gRPC at under half of the V2 REST listener's throughput. This protocol parses and
writes frames itself, straight from the loop's socket callbacks: measured side by side on this
machine with h2load and an empty handler, 14,300-18,500 calls/s on 0.93 cores vs grpc.aio's
3,200-3,900 on 1.27.

What it speaks: HTTP/2 over cleartext with prior knowledge (what gRPC clients and nginx's
grpc_pass use), unary calls only (every RPC of the V2 service and grpc.health.v1's Check);
a streaming RPC answers UNIMPLEMENTED. HPACK decoding is the `hpack` package's (the h2
project's), so the dynamic table and Huffman strings are handled by tested code (a block that
never reads the dynamic table, as nginx sends them, is decoded field by field through a cache
of fields already decoded: `hpack_fields.py`); answers use
literal header fields only, so this side keeps no HPACK state (after the client sets
SETTINGS_HEADER_TABLE_SIZE, the next block written starts with a table size update to 0), and
a header block larger than the client's frame size goes out as HEADERS + CONTINUATION frames.
Flow control is honoured both ways (answers wait for the client's window; the client gets
window updates as bodies are read), frames larger than 16 KiB are refused (never advertised),
and a malformed connection is closed with GOAWAY and the HTTP/2 error code. A client that
does not read what it is sent is not read either: while the transport's write buffer is over
its high-water mark, the connection stops reading (its PINGs, SETTINGS and calls wait) and
answers stop sending DATA, until the client catches up.

Limits: a request message over `max_message_bytes` is answered RESOURCE_EXHAUSTED as soon as
its size is known (its body is dropped as it arrives); calls beyond `max_concurrent_rpcs` in
flight over all connections are answered RESOURCE_EXHAUSTED at once; a connection may hold
`STREAMS_PER_CONNECTION` open streams (more are refused with REFUSED_STREAM); a connection that
does not send the HTTP/2 preface within `PREFACE_TIMEOUT_S` is closed; when the unfinished
request bodies of one connection exceed 4 x `max_message_bytes` (what one connection can make a
worker buffer), or those of all connections exceed `HELD_TOTAL_MESSAGES` x `max_message_bytes`,
the newest unfinished calls of the connection sending are answered RESOURCE_EXHAUSTED and
their bodies dropped until the rest fit, so older calls complete; a request whose body is not
in `UPLOAD_TIMEOUT_S` after its headers is answered DEADLINE_EXCEEDED.
(Withholding the window instead deadlocked: a client interleaving many large calls on one
channel could finish none; 64 calls of 256 KiB over one tritonclient channel, 25 timed out.)
Request metadata over `MAX_HEADER_LIST` (advertised as SETTINGS_MAX_HEADER_LIST_SIZE) is
answered RESOURCE_EXHAUSTED, that call only; a header block over `MAX_HEADER_BLOCK` encoded
bytes, or decoding past `MAX_DECODED`, closes the connection. `grpc-timeout` is honoured
(DEADLINE_EXCEEDED) from the request's headers on, so a call whose body stops arriving expires
too; a client's RST_STREAM cancels its call, which stops counting toward `max_concurrent_rpcs`
at once. A status message is cut to `MAX_DETAILS` characters. Compressed messages
(`grpc-encoding` other than identity) are answered UNIMPLEMENTED; this server never compresses.
`stop(grace)` sends GOAWAY and gives every stream it covers (calls still uploading, running, or
sending their answer) `grace` seconds to end before closing the connections.

Handlers are `async (request, context) -> response` like grpc.aio's servicer methods; the
context offers what they use of grpc.aio's (`invocation_metadata`, `set_trailing_metadata`,
`abort`), so the same servicer runs on either server.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc  # the status vocabulary (StatusCode, aio.AbortError) the servicers speak
import hpack
from google.protobuf.message import DecodeError

from service.v2.hpack_fields import FieldCache

log = logging.getLogger("bento_canary.v2.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 1, 2, 3, 4, 5
S_MAX_HEADER_LIST_SIZE = 6

FRAME_MAX = 16384  # the protocol's default; never raised, so a larger frame is an error
DEFAULT_WINDOW = 65535
MAX_WINDOW = (1 << 31) - 1
RECEIVE_WINDOW = 1 << 20  # what a client may send ahead, per stream and per connection
MAX_HEADER_LIST = 16384  # a request's metadata, as RFC 9113 counts it (advertised); more: RESOURCE_EXHAUSTED
MAX_HEADER_BLOCK = 1 << 16  # HPACK bytes of one header block (CONTINUATIONs included); more: connection error
MAX_DECODED = 1 << 20  # what one block may decode to (hpack's bound); more: connection error
HELD_TOTAL_MESSAGES = 16  # unfinished request bodies all connections may hold, in max_message_bytes
UPLOAD_TIMEOUT_S = 30.0  # a request's body must be in this long after its headers (like REST's read timeout)
MAX_DETAILS = 2048  # characters of a status message written in grpc-message (longer ones are cut)
STREAMS_PER_CONNECTION = 256
PREFACE_TIMEOUT_S = 10.0
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_FRAME_HEAD = struct.Struct(">BHBBI")
_SAFE_MESSAGE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class CallContext:
    """The part of `grpc.aio.ServicerContext` the servicers use."""

    __slots__ = ("_metadata", "trailing", "code", "details")

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.code, self.details = grpc.StatusCode.OK, ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


@dataclass(frozen=True)
class UnaryMethod:
    """One unary RPC: its handler and the protobuf class its request parses into."""

    handler: Callable[[Any, CallContext], Awaitable[Any]]
    request_type: Any


def _hpack_int(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode("ascii"), value.encode("ascii", "replace")
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


# ":status: 200" is static table entry 8 (indexed: 0x88)
_RESPONSE_HEAD = b"\x88" + _literal("content-type", "application/grpc")
_OK_STATUS = _literal("grpc-status", "0")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def _status_block(code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...]) -> bytes:
    if code is grpc.StatusCode.OK:
        block = _OK_STATUS
    else:
        block = _literal("grpc-status", str(code.value[0]))
        if details:
            block += _literal("grpc-message", urllib.parse.quote(details[:MAX_DETAILS], safe=_SAFE_MESSAGE))
    for key, value in trailing:
        block += _literal(key, value)
    return block


def parse_timeout(value: str) -> float | None:
    """`grpc-timeout` ("100m", "5S", ...) in seconds; None when malformed (then ignored)."""
    if 2 <= len(value) <= 9 and value[:-1].isascii() and value[:-1].isdigit() and value[-1] in _TIMEOUT_UNITS:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    return None


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Stream:
    __slots__ = ("id", "headers", "body", "size", "remote_open", "answered", "task", "counted", "send_window",
                 "pending", "unacked", "deadline_hit", "timer", "upload_timer")  # fmt: skip

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.size = 0  # body bytes received, dropped ones included
        self.remote_open = True
        self.answered = False
        self.task: asyncio.Task[None] | None = None
        self.counted = False  # counts in the server's `active_rpcs`
        self.send_window = send_window
        self.pending: tuple[bytes, int, bytes] | None = None  # (data, bytes sent, trailers) waiting for window
        self.unacked = 0
        self.deadline_hit = False
        self.timer: asyncio.TimerHandle | None = None
        self.upload_timer: asyncio.TimerHandle | None = None  # until the request's END_STREAM


class H2GrpcServer:
    """Listens on one address; `methods` maps "/package.Service/Method" to its handler."""

    def __init__(
        self, methods: dict[str, UnaryMethod], max_message_bytes: int, max_concurrent_rpcs: int | None
    ) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_rpcs = max_concurrent_rpcs
        # request bodies one connection may buffer before its newest calls are shed (`_shed_newest`)
        self.held_limit = 4 * max_message_bytes
        # and over all connections (many connections each under their cap)
        self.held_total_limit = HELD_TOTAL_MESSAGES * max_message_bytes
        self.held_total = 0
        self.active_rpcs = 0
        self.connections: set[_Connection] = set()
        self.header_fields = FieldCache()  # header fields already decoded, shared by the connections
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int, reuse_port: bool) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port, backlog=1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float | None) -> None:
        """Stop listening, send GOAWAY, let the streams it promises to process (calls still
        uploading, running or waiting for window to send their answer) finish for `grace`
        seconds, then cancel what is left and close every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.go_away(NO_ERROR)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace or 0.0)
        while any(c.streams for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort_all()
        if self._server is not None:
            await self._server.wait_closed()


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface_seen = False
        # a bound far above MAX_HEADER_LIST: hpack's state is lost when it trips, so only hostile input should
        self.decoder = hpack.Decoder(max_header_list_size=MAX_DECODED)
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self.peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame_max = FRAME_MAX
        self.send_window = DEFAULT_WINDOW  # connection level, ours to spend
        self.unacked = 0  # connection-level bytes received and not yet given back
        self.held = 0  # request bytes buffered in streams not yet parsed (see `_shed_newest`)
        self.continuing: tuple[int, int, bytearray] | None = None  # (stream id, flags, block) mid-CONTINUATION
        self.table_size_update = False  # the next header block written starts with a table size update
        self.writing_paused = False  # the transport's buffer is full: reading and answers' DATA wait
        self.closing = False
        self.preface_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream_transport: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.transport = stream_transport
        self.server.connections.add(self)
        settings = struct.pack(">HIHIHIHI", S_MAX_CONCURRENT_STREAMS, STREAMS_PER_CONNECTION,
                               S_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW, S_ENABLE_PUSH, 0,
                               S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)  # fmt: skip
        window = struct.pack(">I", RECEIVE_WINDOW - DEFAULT_WINDOW)
        stream_transport.write(_frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, window))
        self.preface_timer = asyncio.get_running_loop().call_later(PREFACE_TIMEOUT_S, self._preface_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        if self.preface_timer is not None:
            self.preface_timer.cancel()
        for stream in self.streams.values():
            self._forget(stream)
        self.streams.clear()

    def pause_writing(self) -> None:
        """The peer does not read: stop reading its frames (PINGs, SETTINGS, calls) and sending
        DATA until it does, so what it makes this side buffer stays bounded."""
        self.writing_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.transport is None or self.transport.is_closing():
            return
        out: list[bytes] = []
        self._flush_pending(out)
        self._write(out)
        if not self.writing_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        out: list[bytes] = []
        try:
            if not self.preface_seen:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 prior-knowledge connection")
                    return
                if buffer[: len(PREFACE)] != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 prior-knowledge connection")
                del buffer[: len(PREFACE)]
                self.preface_seen = True
                if self.preface_timer is not None:
                    self.preface_timer.cancel()
            pos, end = 0, len(buffer)
            while end - pos >= 9:
                high, low, kind, flags, stream_id = _FRAME_HEAD.unpack_from(buffer, pos)
                length = (high << 16) | low
                if length > FRAME_MAX:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes (limit {FRAME_MAX})")
                if end - pos - 9 < length:
                    break
                payload = bytes(buffer[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self._frame_received(kind, flags, stream_id & 0x7FFFFFFF, payload, out)
            del buffer[:pos]
        except _ConnectionError as exc:
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
            log.debug("closing an HTTP/2 connection: %s", exc)  # a client's fault: not worth a log line each
            self.go_away(exc.code, str(exc))
            self.abort_all()
            return
        self._give_back(out)
        self._write(out)

    def _write(self, out: list[bytes]) -> None:
        """Write the frames; a closing connection with no stream left is closed after them."""
        if self.transport is None:
            return
        if out:
            self.transport.write(b"".join(out))
        if self.closing and not self.streams:
            self.transport.close()

    def _give_back(self, out: list[bytes]) -> None:
        """Return the connection's window for what was read (buffering is capped by
        `_shed_newest`, never by withholding window: that can leave every call half-sent)."""
        if self.unacked >= RECEIVE_WINDOW // 4:
            out.append(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0

    def _release(self, stream: _Stream) -> None:
        self.held -= len(stream.body)
        self.server.held_total -= len(stream.body)
        stream.body = bytearray()

    def _shed_newest(self, out: list[bytes]) -> None:
        """Unfinished bodies exceed this connection's `held_limit` or the server's
        `held_total_limit`: answer this connection's newest calls still being sent
        RESOURCE_EXHAUSTED (dropping their bodies) until both fit."""
        server = self.server
        sending = [s for s in self.streams.values() if s.remote_open and not s.answered and s.body]
        for stream in sorted(sending, key=lambda s: s.id, reverse=True):
            if self.held > server.held_limit:
                whose, limit = "this connection's", server.held_limit
            elif server.held_total > server.held_total_limit:
                whose, limit = "the server's", server.held_total_limit
            else:
                return
            details = f"{whose} unfinished requests hold more than {limit} bytes; retry the call"
            self._answer(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, details, (), None, out)

    # --- frames -----------------------------------------------------------------------
    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if self.continuing is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload, out)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload, out)
        elif kind == CONTINUATION:
            if self.continuing is None or self.continuing[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without a header block")
            block = self.continuing[2]
            block += payload
            if len(block) > MAX_HEADER_BLOCK:
                raise _ConnectionError(PROTOCOL_ERROR, "request headers too large")
            if flags & END_HEADERS:
                _, first_flags, _ = self.continuing
                self.continuing = None
                self._header_block(first_flags, stream_id, bytes(block), out)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload, out)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, out)
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise _ConnectionError(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                out.append(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4 or not stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "bad RST_STREAM")
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._close_stream(stream)
        elif kind == GOAWAY:
            self.closing = True  # closed once its last stream ends (`_write`)
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client cannot push")
        elif kind == PRIORITY:
            if stream_id == 0 or len(payload) != 5:
                raise _ConnectionError(PROTOCOL_ERROR, "bad PRIORITY")
        # other frame types are extensions: ignored (RFC 9113 5.5)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _headers(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnectionError(PROTOCOL_ERROR, "bad HEADERS priority")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(flags, stream_id, block, out)
        else:
            self.continuing = (stream_id, flags, bytearray(block))

    def _header_block(self, flags: int, stream_id: int, block: bytes, out: list[bytes]) -> None:
        try:
            fields = self.server.header_fields.decode(self.decoder, block)
        except Exception as exc:  # noqa: BLE001 - hpack's errors: the connection's state is lost
            raise _ConnectionError(COMPRESSION_ERROR, f"undecodable headers ({type(exc).__name__})") from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: only their END_STREAM matters, once
            if flags & END_STREAM and stream.remote_open:
                self._end_of_request(stream, out)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream_id:
            if stream_id <= self.last_stream_id and stream_id % 2:
                return  # a stream we already closed (reset or answered): nothing to do
            raise _ConnectionError(PROTOCOL_ERROR, f"stream id {stream_id} is not a new client stream")
        self.last_stream_id = stream_id
        if self.closing:
            out.append(_frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        if len(self.streams) >= STREAMS_PER_CONNECTION:
            out.append(_frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return
        stream = _Stream(stream_id, self.peer_window)
        size = sum(len(name) + len(value) + 32 for name, value in fields)  # RFC 9113 6.5.2
        if size > MAX_HEADER_LIST:  # this call only is refused; the connection's HPACK state is intact
            self.streams[stream_id] = stream
            stream.remote_open = not flags & END_STREAM
            details = f"request metadata of {size} bytes is over the limit ({MAX_HEADER_LIST})"
            self._answer(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, details, (), None, out)
            return
        headers = stream.headers
        for name, value in fields:
            headers[name] = value if name not in headers else f"{headers[name]},{value}"
        self.streams[stream_id] = stream
        timeout = headers.get("grpc-timeout")
        seconds = parse_timeout(timeout) if timeout else None
        if seconds is not None:  # armed now: a call whose body stops arriving expires too
            stream.timer = asyncio.get_running_loop().call_later(seconds, self._deadline, stream)
        if flags & END_STREAM:
            self._end_of_request(stream, out)
        else:  # without a grpc-timeout too, a stalled upload is not held for ever
            stream.upload_timer = asyncio.get_running_loop().call_later(
                UPLOAD_TIMEOUT_S, self._upload_timed_out, stream
            )

    def _data(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        self.unacked += len(payload)  # flow control counts padding and dropped data too
        stream = self.streams.get(stream_id)
        if stream is None or not stream.remote_open:
            if stream_id > self.last_stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # reset or answered already: dropped
        data = self._unpad(flags, payload)
        stream.size += len(data)
        if not stream.answered:
            stream.body += data
            self.held += len(data)
            self.server.held_total += len(data)
            body, limit = stream.body, self.server.max_message_bytes
            # the message's declared length (its 5-byte prefix) is refused as soon as it is read
            declared = struct.unpack_from(">I", body, 1)[0] if len(body) >= 5 else 0
            if declared > limit or stream.size > limit + 5:
                size = max(declared, stream.size - 5)
                self._answer(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"Received message larger than max ({size} vs. {limit})", (), None, out)  # fmt: skip
            elif self.held > self.server.held_limit or self.server.held_total > self.server.held_total_limit:
                self._shed_newest(out)
        if flags & END_STREAM:
            self._end_of_request(stream, out)
        elif self.streams.get(stream_id) is stream:  # not answered and closed meanwhile
            stream.unacked += len(payload)
            if stream.unacked >= RECEIVE_WINDOW // 4:
                out.append(_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", stream.unacked)))
                stream.unacked = 0

    def _settings(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad SETTINGS length")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == S_HEADER_TABLE_SIZE:
                self.table_size_update = True
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream window would pass 2^31-1")
            elif key == S_MAX_FRAME_SIZE:
                if not FRAME_MAX <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad max frame size")
                self.peer_frame_max = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "bad enable push")
        out.append(_frame(SETTINGS, ACK, 0))
        self._flush_pending(out)

    def _window_update(self, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE length")
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "a connection window update of 0")
            if self.send_window + increment > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection window would pass 2^31-1")
            self.send_window += increment
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            if increment == 0 or stream.send_window + increment > MAX_WINDOW:
                code = PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR
                out.append(_frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))
                self._close_stream(stream)
                return
            stream.send_window += increment
        self._flush_pending(out)

    # --- calls ------------------------------------------------------------------------
    def _end_of_request(self, stream: _Stream, out: list[bytes]) -> None:
        stream.remote_open = False
        if stream.upload_timer is not None:
            stream.upload_timer.cancel()
            stream.upload_timer = None
        if stream.answered:
            if stream.pending is None:
                self._close_stream(stream)
            return
        server = self.server
        if server.max_concurrent_rpcs is not None and server.active_rpcs >= server.max_concurrent_rpcs:
            self._answer(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in flight", (), None, out)
            return
        server.active_rpcs += 1
        stream.counted = True
        stream.task = asyncio.get_running_loop().create_task(self._call(stream))
        stream.task.add_done_callback(lambda _: self._uncount(stream))  # a call cancelled before it ran too

    def _uncount(self, stream: _Stream) -> None:
        """The call no longer counts in flight: once, when it is answered, reset or forgotten."""
        if stream.counted:
            stream.counted = False
            self.server.active_rpcs -= 1

    def _deadline(self, stream: _Stream) -> None:
        stream.timer = None
        if stream.task is not None and not stream.task.done():
            stream.deadline_hit = True
            stream.task.cancel()
        elif stream.task is None:  # no call started yet (its body is still arriving)
            self._expire(stream, "Deadline Exceeded")

    def _upload_timed_out(self, stream: _Stream) -> None:
        stream.upload_timer = None
        if stream.remote_open:
            self._expire(stream, f"the request did not arrive within {UPLOAD_TIMEOUT_S:g} s of its headers")

    def _expire(self, stream: _Stream, details: str) -> None:
        """A call still being received runs out of time: answered DEADLINE_EXCEEDED, body dropped."""
        if not stream.answered and self.streams.get(stream.id) is stream:
            out: list[bytes] = []
            self._answer(stream, grpc.StatusCode.DEADLINE_EXCEEDED, details, (), None, out)
            self._write(out)

    def _refusal(self, stream: _Stream) -> tuple[grpc.StatusCode, str] | None:
        headers = stream.headers
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith("application/grpc"):
            return grpc.StatusCode.INTERNAL, "not a gRPC request (POST with content-type application/grpc)"
        body = stream.body
        if len(body) < 5:
            return grpc.StatusCode.INTERNAL, "the call carried no request message"
        if body[0] == 1:
            encoding = headers.get("grpc-encoding", "identity")
            return grpc.StatusCode.UNIMPLEMENTED, f"message compression ({encoding}) is not supported"
        if body[0] != 0 or struct.unpack_from(">I", body, 1)[0] != len(body) - 5:
            return grpc.StatusCode.INTERNAL, "the request is not one length-prefixed gRPC message"
        return None

    async def _call(self, stream: _Stream) -> None:
        context = CallContext(tuple((k, v) for k, v in stream.headers.items() if not k.startswith(":")))
        response = None
        try:
            method = self.server.methods.get(stream.headers.get(":path", ""))
            refusal = self._refusal(stream)
            if method is None:
                context.code, context.details = grpc.StatusCode.UNIMPLEMENTED, "Method not found!"
            elif refusal is not None:
                context.code, context.details = refusal
            else:
                try:
                    request = method.request_type.FromString(bytes(stream.body[5:]))
                except DecodeError:
                    context.code, context.details = grpc.StatusCode.INTERNAL, "the request message does not parse"
                else:
                    self._release(stream)
                    message = await method.handler(request, context)
                    response = message.SerializeToString()
                    if len(response) > self.server.max_message_bytes:
                        context.code = grpc.StatusCode.RESOURCE_EXHAUSTED
                        context.details = (
                            f"Sent message larger than max ({len(response)} vs. {self.server.max_message_bytes})"
                        )
                        response = None
        except grpc.aio.AbortError:
            response = None  # the context holds the status
        except asyncio.CancelledError:
            if not stream.deadline_hit:  # the client reset the stream or the server stops: no answer
                raise
            context.code, context.details, response = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None
        except Exception:
            log.exception("internal error in %s", stream.headers.get(":path"))
            context.code, context.details, response = grpc.StatusCode.INTERNAL, "internal error", None
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        stream.task = None
        if self.transport is None or self.transport.is_closing() or self.streams.get(stream.id) is not stream:
            return
        out: list[bytes] = []
        self._answer(stream, context.code, context.details, context.trailing, response, out)
        self._write(out)

    def _answer(self, stream: _Stream, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...],
                response: bytes | None, out: list[bytes]) -> None:  # fmt: skip
        stream.answered = True
        self._release(stream)
        status = _status_block(code, details, trailing)
        if response is None:  # trailers-only answer
            self._header_frames(stream.id, _RESPONSE_HEAD + status, END_STREAM, out)
            self._finished(stream, out)
            return
        self._header_frames(stream.id, _RESPONSE_HEAD, 0, out)
        stream.pending = (b"\x00" + struct.pack(">I", len(response)) + response, 0, status)
        self._send(stream, out)

    def _header_frames(self, stream_id: int, block: bytes, flags: int, out: list[bytes]) -> None:
        """A header block as HEADERS + CONTINUATION frames of at most the peer's frame size."""
        if self.table_size_update:  # the peer changed SETTINGS_HEADER_TABLE_SIZE: size 0 (RFC 7541 4.2)
            self.table_size_update = False
            block = b"\x20" + block
        size, kind = self.peer_frame_max, HEADERS
        for start in range(0, len(block), size):
            last = start + size >= len(block)
            out.append(_frame(kind, flags | (END_HEADERS if last else 0), stream_id, block[start : start + size]))
            kind, flags = CONTINUATION, 0

    def _send(self, stream: _Stream, out: list[bytes]) -> None:
        """Send what the windows allow of the stream's answer; the rest waits for WINDOW_UPDATE
        (or, while the transport's buffer is full, for `resume_writing`)."""
        assert stream.pending is not None
        data, sent, status = stream.pending
        view = memoryview(data)
        while sent < len(data):
            room = min(len(data) - sent, self.send_window, stream.send_window, self.peer_frame_max)
            if room <= 0 or self.writing_paused:
                stream.pending = (data, sent, status)
                return
            out.append(_frame(DATA, 0, stream.id, view[sent : sent + room]))
            sent += room
            self.send_window -= room
            stream.send_window -= room
        stream.pending = None
        self._header_frames(stream.id, status, END_STREAM, out)
        self._finished(stream, out)

    def _flush_pending(self, out: list[bytes]) -> None:
        for stream in [s for s in self.streams.values() if s.pending is not None]:
            if self.send_window <= 0:
                return
            self._send(stream, out)

    def _finished(self, stream: _Stream, out: list[bytes]) -> None:
        """Our side is done; a client still sending gets RST_STREAM(NO_ERROR) (RFC 9113 8.1)."""
        if stream.remote_open:
            out.append(_frame(RST_STREAM, 0, stream.id, struct.pack(">I", NO_ERROR)))
        self._close_stream(stream)

    def _close_stream(self, stream: _Stream) -> None:
        """The stream is done (the connection, if closing and left without streams, is closed
        by the `_write` that follows)."""
        self.streams.pop(stream.id, None)
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self._release(stream)
        self._uncount(stream)
        stream.pending = None
        for timer in (stream.timer, stream.upload_timer):
            if timer is not None:
                timer.cancel()
        stream.timer = stream.upload_timer = None
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    # --- shutting down ------------------------------------------------------------------
    def _preface_timed_out(self) -> None:
        self.preface_timer = None
        if not self.preface_seen and self.transport is not None:
            self.transport.close()

    def go_away(self, code: int, reason: str = "") -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            debug = reason.encode("ascii", "replace")[:200]
            self.transport.write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, code) + debug))
            if not self.streams:
                self.transport.close()

    def abort_all(self) -> None:
        for stream in list(self.streams.values()):
            self._forget(stream)
        self.streams.clear()
        if self.transport is not None:
            self.transport.close()

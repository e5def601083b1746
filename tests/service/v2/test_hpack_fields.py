"""service/v2/hpack_fields.py: a block decoded field by field through the cache must give what
the connection's own hpack decoder gives, leave that decoder's table as hpack would, and fail
where hpack fails; and the header blocks nginx sends must really take the cached path."""

from __future__ import annotations

import subprocess

import hpack
import pytest
import tritonclient.grpc as triton
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.process import free_port
from service.v2 import h2_server as h2
from service.v2.hpack_fields import FieldCache
from tests.service.v2.test_grpc import assert_answers, raw_request, serving, tin
from tests.service.v2.test_h2_server import INFER, RawClient, assert_model_answer, framed
from tests.support.tiny_model import digits_rows, tiny_core
from tests.support.tools import require_tool
from tests.support.waiting import wait_until

NGINX_CALL = [(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
              (":authority", "127.0.0.1:40123"), ("content-type", "application/grpc"),
              ("user-agent", "grpc-c/1.62.0 (linux; chttp2)"), ("te", "trailers"),
              ("grpc-accept-encoding", "identity, deflate, gzip")]  # fmt: skip
STATIC_INDEX = {(n.decode(), v.decode()): i + 1 for i, (n, v) in enumerate(hpack.table.HeaderTable.STATIC_TABLE)}
STATIC_NAME = {n.decode(): i + 1 for i, (n, _) in reversed(list(enumerate(hpack.table.HeaderTable.STATIC_TABLE)))}


def _string(text: str, huffman: bool) -> bytes:
    raw = text.encode()
    if huffman:
        raw = hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                           hpack.huffman_constants.REQUEST_CODES_LENGTH).encode(raw)  # fmt: skip
    return h2._hpack_int(len(raw), 7, 0x80 if huffman else 0) + raw


def proxy_block(
    headers: list[tuple[str, str]], huffman: bool = True, never: bool = False, indexed: tuple[str, ...] = ()
) -> bytes:
    """Headers as a proxy keeping no encoder state writes them: static-table references where the
    pair is in the static table, else literals (a static name index where there is one) without
    indexing, or with incremental indexing for the names in `indexed` (nginx: :path, :authority)."""
    out = b""
    for name, value in headers:
        flag, bits = (0x40, 6) if name in indexed else (0x10 if never else 0x00, 4)
        if (name, value) in STATIC_INDEX:
            out += h2._hpack_int(STATIC_INDEX[name, value], 7, 0x80)
        elif name in STATIC_NAME:
            out += h2._hpack_int(STATIC_NAME[name], bits, flag) + _string(value, huffman)
        else:
            out += bytes([flag]) + _string(name, huffman) + _string(value, huffman)
    return out


def nginx_block(headers: list[tuple[str, str]]) -> bytes:
    return proxy_block(headers, indexed=(":path", ":authority"))


def table(decoder: hpack.Decoder) -> tuple:
    return tuple(decoder.header_table.dynamic_entries), decoder.header_table._current_size, decoder.header_table_size


def outcome(decode, block: bytes):
    try:
        return [tuple(field) for field in decode(block)]
    except Exception as exc:  # noqa: BLE001 - the comparison is of who fails, not how
        return ("error", isinstance(exc, hpack.HPACKError))


def test_a_proxys_block_is_decoded_once_then_answered_from_the_cache():
    cache, decoder, plain = FieldCache(), hpack.Decoder(), hpack.Decoder()
    block = nginx_block([*NGINX_CALL, ("grpc-timeout", "4999915u")])
    for _ in range(3):
        assert cache.decode(decoder, block) == plain.decode(block) == [*NGINX_CALL, ("grpc-timeout", "4999915u")]
        assert table(decoder) == table(plain)  # :path and :authority added, as hpack adds them
    # 7 literal fields (the rest are static references), decoded by hpack the first time only;
    # then the whole block is known
    assert (cache.misses, cache.hits, cache.whole_blocks) == (7, 18, 0)
    assert len(decoder.header_table.dynamic_entries) == 6


def test_a_field_that_changes_per_call_is_the_only_one_decoded_again():
    cache, decoder = FieldCache(), hpack.Decoder()
    for timeout in ("4999915u", "4999870u", "4999902u"):
        assert cache.decode(decoder, nginx_block([*NGINX_CALL, ("grpc-timeout", timeout)]))[-1] == (
            "grpc-timeout",
            timeout,
        )
    assert cache.misses == 6 + 3


def test_blocks_that_use_the_dynamic_table_go_to_hpack_and_keep_its_table_right():
    """A client like tritonclient indexes its headers: the second call refers to the table."""
    encoder, cache, decoder, plain = hpack.Encoder(), FieldCache(), hpack.Decoder(), hpack.Decoder()
    for _ in range(3):
        block = encoder.encode(NGINX_CALL)
        assert cache.decode(decoder, block) == plain.decode(block) == NGINX_CALL
        assert table(decoder) == table(plain)
    # the first block only adds to the table (split here); the next two refer to it (hpack's)
    assert cache.whole_blocks == 2


def test_the_cache_stays_bounded_under_a_flood_of_distinct_fields():
    cache, decoder = FieldCache(max_fields=64), hpack.Decoder()
    for n in range(1000):
        assert cache.decode(decoder, proxy_block([("x-request-id", f"id-{n}")]))[0] == ("x-request-id", f"id-{n}")
    assert len(cache._fields) == 64 and len(cache._blocks) <= 256
    huge = proxy_block([("x-big", "v" * 2000)], huffman=False)
    assert cache.decode(decoder, huge) == [("x-big", "v" * 2000)]
    assert all(len(encoded) <= cache.max_field_bytes for encoded in cache._fields)


def test_a_field_marked_never_indexed_is_never_remembered():
    """A credential sent never-indexed (RFC 7541 7.1.3) is decoded each time; neither it nor
    its block stays in the worker's cache."""
    cache, decoder = FieldCache(), hpack.Decoder()
    secret = proxy_block([("authorization", "Bearer s3cr3t")], never=True)
    for _ in range(2):
        assert cache.decode(decoder, nginx_block(NGINX_CALL) + secret)[-1] == ("authorization", "Bearer s3cr3t")
    assert cache.misses == 6 + 2  # nginx's 6 literal fields once, plus the secret every time
    assert not any("s3cr3t" in header[1] for header, _ in cache._fields.values())
    assert not cache._blocks


def test_a_block_decoding_past_the_decoders_bound_fails_as_hpack_fails():
    # 1-byte static references inflate ~50x: 40,000 of them decode to ~2 MB (the bound is 1 MiB)
    block = h2._hpack_int(STATIC_INDEX["accept-encoding", "gzip, deflate"], 7, 0x80) * 40_000
    decoder = hpack.Decoder(max_header_list_size=h2.MAX_DECODED)
    with pytest.raises(hpack.OversizedHeaderListError):
        FieldCache().decode(decoder, block)


headers = st.lists(
    st.tuples(
        st.sampled_from([n for n, _ in NGINX_CALL] + ["x-a", "x-b", "grpc-timeout", "accept-encoding"]),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=40),
    ),
    max_size=10,
)


def test_a_decoder_waiting_for_a_table_size_update_refuses_a_stateless_block_as_hpack_does():
    """After SETTINGS_HEADER_TABLE_SIZE shrinks, hpack refuses blocks until the peer shrinks."""
    cache, decoder = FieldCache(), hpack.Decoder()
    decoder.max_allowed_table_size = 256
    with pytest.raises(hpack.InvalidTableSizeError):
        cache.decode(decoder, proxy_block(NGINX_CALL))
    assert cache.decode(decoder, h2._hpack_int(256, 5, 0x20) + proxy_block(NGINX_CALL)) == NGINX_CALL
    assert decoder.header_table_size == 256


HOW = ["hpack", "hpack-huffman", "proxy", "proxy-raw", "never", "nginx", "size-update", "dynamic-name", "dynamic-index"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(headers, st.sampled_from(HOW), st.sampled_from([0, 64, 4096])), min_size=1, max_size=6))
def test_any_sequence_of_blocks_decodes_as_hpack_decodes_it(blocks):
    """One connection's blocks: some indexing (hpack's encoder), some stateless (a proxy's), some
    stateless but for one part that reads or resizes the dynamic table."""
    encoder, cache, decoder, plain = hpack.Encoder(), FieldCache(max_fields=8), hpack.Decoder(), hpack.Decoder()
    for fields, how, size in blocks:
        if how.startswith("hpack"):
            block = encoder.encode(fields, huffman=how == "hpack-huffman")
        else:
            indexed = (":path", ":authority", "x-a") if how in ("nginx", "dynamic-name", "dynamic-index") else ()
            block = proxy_block(fields, huffman=how != "proxy-raw", never=how == "never", indexed=indexed)
        if how == "size-update":  # then the encoder's table no longer matches: start it afresh
            block, encoder = h2._hpack_int(size, 5, 0x20) + block, hpack.Encoder()
            encoder.header_table_size = size
        elif how == "dynamic-name":  # a literal without indexing naming the newest table entry
            block += h2._hpack_int(62, 4) + _string("v", True)
        elif how == "dynamic-index":
            block += h2._hpack_int(62, 7, 0x80)
        assert outcome(lambda b: cache.decode(decoder, b), block) == outcome(plain.decode, block)
        assert table(decoder) == table(plain)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_hostile_bytes_fail_or_decode_exactly_as_hpack_does(prefix, block):
    """Two blocks on one connection, the first possibly filling the dynamic table."""
    cache, decoder, plain = FieldCache(), hpack.Decoder(), hpack.Decoder()
    for data in (prefix, block, nginx_block(NGINX_CALL) + block, block):
        ours, theirs = outcome(lambda b: cache.decode(decoder, b), data), outcome(plain.decode, data)
        assert ours == theirs
        if isinstance(ours, tuple):
            return  # the server closes the connection: the table no longer matters
        assert table(decoder) == table(plain)


NGINX_CONF = """
daemon off; master_process off; worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off; client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
    upstream slot {{ server 127.0.0.1:{slot}; keepalive 8; }}
    server {{ listen 127.0.0.1:{port} http2; location / {{ grpc_pass grpc://slot; }} }}
}}
"""


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return tiny_core(tmp_path_factory.mktemp("hpack-model"), max_rows=64)


def test_nginxs_blocks_take_the_cached_path_and_calls_through_it_are_answered_right(core, tmp_path):
    """The real proxy in front of the lean server, as in a stack: every block it forwards is
    stateless (no whole-block hpack decode), and only fields that change are decoded again."""
    nginx = require_tool("nginx", installs="nginx-light")
    port = free_port()
    with serving(lambda: core, transport="lean") as served:
        (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(prefix=tmp_path, slot=served.endpoint.port, port=port))
        proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                stderr=subprocess.PIPE)  # fmt: skip
        try:
            client = triton.InferenceServerClient(f"127.0.0.1:{port}")
            wait_until(lambda: _ready(client), 10.0, "nginx in front of the lean server")
            fields = served.endpoint.server.header_fields
            blocks_before, misses_before = fields.whole_blocks, fields.misses
            for n in range(1, 21):  # a client deadline per call: grpc-timeout differs every time
                assert_answers(client, core, n=n % 4 + 1)
                client.infer("digits", [tin(digits_rows(1, seed=n))], client_timeout=5.0 + n / 7)
            assert fields.whole_blocks == blocks_before
            assert 20 <= fields.misses - misses_before <= 60 and fields.hits > 200
            client.close()
        finally:
            proc.terminate()
            proc.wait(10)


def _ready(client: triton.InferenceServerClient) -> bool:
    try:
        return bool(client.is_server_ready())
    except triton.InferenceServerException:
        return False


def test_a_connection_reading_back_what_nginxs_blocks_indexed_is_answered_right(core):
    """On one connection: nginx's block split over HEADERS + CONTINUATION, the same block
    whole, then a block that names :path and :authority by the dynamic-table entries those
    blocks added (which this module replayed into the connection's table): three right answers."""
    rows = digits_rows(3, seed=5)
    body = framed(raw_request(rows).SerializeToString())
    call = [*NGINX_CALL[:2], (":path", INFER), *NGINX_CALL[3:]]
    block = nginx_block(call)
    rest = b"".join(proxy_block([field]) for field in call[4:])
    by_table = bytes([0x83, 0x86, 0x80 | 63, 0x80 | 62]) + rest  # POST, http, then :path and :authority
    with serving(lambda: core, transport="lean") as served:
        client = RawClient(served.url)
        try:
            client.send(h2.HEADERS, 0, 1, block[:20])
            client.send(h2.CONTINUATION, h2.END_HEADERS, 1, block[20:])
            client.send(h2.DATA, h2.END_STREAM, 1, body)
            client.send(h2.HEADERS, h2.END_HEADERS, 3, block)
            client.send(h2.DATA, h2.END_STREAM, 3, body)
            client.send(h2.HEADERS, h2.END_HEADERS, 5, by_table)
            client.send(h2.DATA, h2.END_STREAM, 5, body)
            for stream_id in (1, 3, 5):
                assert_model_answer(client.answer(stream_id), core, rows)
        finally:
            client.close()
        assert served.endpoint.server.header_fields.whole_blocks == 1  # the third block, by hpack


def test_a_field_decoding_larger_than_hpacks_default_bound_is_decoded_as_the_connections_decoder_does():
    """One Huffman-coded value of 96,000 characters (60 KB on the wire, under the block limit):
    within the connection decoder's bound, so it decodes, as with hpack (the server then refuses
    the call's metadata as too large, not the connection)."""
    block = proxy_block([("x-big", "a" * 96_000)])
    assert len(block) < h2.MAX_HEADER_BLOCK
    plain = hpack.Decoder(max_header_list_size=h2.MAX_DECODED)
    decoder = hpack.Decoder(max_header_list_size=h2.MAX_DECODED)
    assert FieldCache().decode(decoder, block) == plain.decode(block) == [("x-big", "a" * 96_000)]

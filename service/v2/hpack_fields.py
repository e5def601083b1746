"""Header blocks that never read the HPACK dynamic table, decoded once per distinct field.

Why: nginx's grpc_pass opens one upstream connection per call in flight and writes every request
header as a Huffman-coded literal (`:path` and `:authority` with incremental indexing, the rest
without), never referring to its earlier entries, so the dynamic table never saves a decode; the
`hpack` package decodes Huffman strings in pure Python, nibble by nibble (about 60 us for a
tritonclient-sized block on this machine). Behind nginx that was 11% of the worker's CPU per gRPC
call against 6% direct (py-spy). Yet a literal that names no dynamic entry means the same on
every connection: the same bytes always decode to the same header.

So a block made only of static-table references and of such literals (static or new names) is
split into its fields here, and each field's bytes are looked up in a bounded table shared by
the worker's connections; a field seen for the first time is decoded by `hpack` itself, on a
decoder of this module's own (the field reads nothing from its table). The literals with
incremental indexing are then added to the connection's table in order, as hpack adds them, so
the next block that does refer to them finds what hpack would have. A whole block already seen
is answered at once (a proxy repeats the same block call after call; with a per-call
`grpc-timeout` only that field is decoded again). A field its sender marked never-indexed
(RFC 7541 7.1.3: a credential, say) is decoded every time and neither it nor its block is
remembered, so the cache never holds a secret and its timing tells nobody what another client
sent. Measured on this machine for nginx's block of a tritonclient call: hpack 62 us, field by
field 9.5 us, a known block 0.35 us.
Any other block (an index past the static table, a table size update, a truncated or overlong
integer or string, more decoded bytes than the decoder allows) goes whole to the connection's
own `hpack.Decoder`, untouched by this module: its table, its answer and its errors are then
exactly hpack's.
"""

from __future__ import annotations

import hpack
from hpack.table import HeaderTable

MAX_FIELDS = 1024  # distinct fields remembered per worker; the oldest goes first
MAX_FIELD_BYTES = 512  # a longer field is decoded every time and not remembered
MAX_BLOCKS = 256  # whole stateless blocks remembered (a proxy repeats the same block for every call)
MAX_BLOCK_BYTES = 1024
_STATIC: tuple[tuple[str, str], ...] = tuple((n.decode(), v.decode()) for n, v in HeaderTable.STATIC_TABLE)
_Field = tuple[tuple[str, str], tuple[bytes, bytes]]  # the header, and its bytes (what a table entry holds)
_UNBOUNDED = 1 << 62
_INT_BYTES = 4  # continuation bytes of one integer: values up to 2**28, far above any length here


def _integer(block: bytes, at: int, mask: int) -> tuple[int, int]:
    """The HPACK integer (RFC 7541 5.1) whose prefix is the low bits `mask` of block[at], and the
    index after it; (-1, 0) when it is truncated or longer than this module follows."""
    value = block[at] & mask
    at += 1
    if value < mask:
        return value, at
    for shift in range(0, 7 * _INT_BYTES, 7):
        if at >= len(block):
            return -1, 0
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
    return -1, 0


def _string_end(block: bytes, at: int) -> int:
    """The index after the string literal (RFC 7541 5.2) starting at `at`; 0 when truncated."""
    if at >= len(block):
        return 0
    length, at = _integer(block, at, 0x7F)
    if length < 0 or at + length > len(block):
        return 0
    return at + length


class FieldCache:
    """Decodes header blocks for a worker's connections (see the module's docstring)."""

    def __init__(self, max_fields: int = MAX_FIELDS, max_field_bytes: int = MAX_FIELD_BYTES) -> None:
        self.max_fields, self.max_field_bytes = max_fields, max_field_bytes
        self._fields: dict[bytes, _Field] = {}
        # blocks already split: their fields and the entries they add to the dynamic table, in
        # order (every connection's decoder has the same bound, which they were checked against)
        self._blocks: dict[bytes, tuple[list[tuple[str, str]], list[tuple[bytes, bytes]]]] = {}
        # decodes one literal at a time; its table is never read, and the bound on what a block
        # may decode to is the connection decoder's, checked in `_split` (hpack's default, 64 KiB,
        # would refuse one large field the connection's decoder accepts)
        self._lone = hpack.Decoder(max_header_list_size=_UNBOUNDED)
        self.hits = self.misses = self.whole_blocks = 0

    def decode(self, decoder: hpack.Decoder, block: bytes) -> list[tuple[str, str]]:
        """The block's fields in order, as `decoder.decode(block)` would give them, with
        `decoder`'s dynamic table left as that call would leave it."""
        if decoder.header_table_size > decoder.max_allowed_table_size:  # hpack refuses the block
            return decoder.decode(block)  # type: ignore[return-value]
        known = self._blocks.get(block)
        if known is None:
            split = self._split(block, decoder.max_header_list_size)
            if split is None:
                self.whole_blocks += 1
                return decoder.decode(block)  # type: ignore[return-value]  # str: raw=False
            fields, additions, sensitive = split
            known = (fields, additions)
            if len(block) <= MAX_BLOCK_BYTES and not sensitive:
                if len(self._blocks) >= MAX_BLOCKS:
                    del self._blocks[next(iter(self._blocks))]
                self._blocks[bytes(block)] = known
        else:
            self.hits += len(known[0])
        fields, additions = known
        for name, value in additions:
            decoder.header_table.add(name, value)
        return list(fields)

    def _split(
        self, block: bytes, max_list_size: int
    ) -> tuple[list[tuple[str, str]], list[tuple[bytes, bytes]], bool] | None:
        """The block's fields, the table additions it makes, and whether it holds a never-indexed
        field; None when it is not one this module decodes."""
        fields: list[tuple[str, str]] = []
        additions: list[tuple[bytes, bytes]] = []
        sensitive = False
        size, at, end = 0, 0, len(block)
        static_count = len(_STATIC)
        while at < end:
            first = block[at]
            if first & 0x80:  # indexed field: the static table's only
                index, at = _integer(block, at, 0x7F)
                if not 0 < index <= static_count:
                    return None
                field = _STATIC[index - 1]
            elif first & 0x40 or not first & 0x20:  # a literal, with incremental indexing (0x40) or not
                start = at
                name_index, at = _integer(block, at, 0x3F if first & 0x40 else 0x0F)
                if name_index < 0 or name_index > static_count:
                    return None
                if name_index == 0:
                    at = _string_end(block, at)
                    if not at:
                        return None
                at = _string_end(block, at)
                if not at:
                    return None
                never = not first & 0x40 and bool(first & 0x10)  # the sender marked it sensitive
                sensitive |= never
                field, raw = self._field(block[start:at], remember=not never)
                if first & 0x40:
                    additions.append(raw)
            else:  # a dynamic table size update (0x20)
                return None
            fields.append(field)
            size += len(field[0]) + len(field[1]) + 32  # RFC 7541 4.1, as hpack counts it
            if size > max_list_size // 2:  # near hpack's bound (it counts bytes, these are characters)
                return None
        return fields, additions, sensitive

    def _field(self, encoded: bytes, remember: bool) -> _Field:
        known = self._fields.get(encoded)
        if known is not None:
            self.hits += 1
            return known
        self.misses += 1
        # hpack's own decoding of the literal; its errors (bad Huffman, truncation) are the caller's
        ((name, value),) = self._lone.decode(encoded, raw=True)
        try:
            field = ((name.decode("utf-8"), value.decode("utf-8")), (bytes(name), bytes(value)))
        except UnicodeDecodeError as exc:
            raise hpack.HPACKDecodingError("Unable to decode headers as UTF-8") from exc
        if remember and len(encoded) <= self.max_field_bytes:
            if len(self._fields) >= self.max_fields:
                del self._fields[next(iter(self._fields))]
            self._fields[encoded] = field
        return field

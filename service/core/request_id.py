"""Request ids: one id per answered request, from nginx or the client, else made here.

nginx stamps `X-Request-Id` on every request it forwards (keeping a client's id when it is
sane by the same rule as `sane_request_id`); a slot called directly keeps a sane id and
makes one otherwise. The adapters echo the id (REST header, gRPC trailing metadata `x-request-id`,
the V2 `id` when the request had none of its own) and the prediction log is keyed by it.
"""

from __future__ import annotations

import os
import re

HEADER = "x-request-id"  # REST header and gRPC metadata key (gRPC keys are lower-case)
MAX_LENGTH = 128
# Letters, digits and . _ : - only: safe in logs, Redis keys, SQL and CSV without escaping.
# The same rule is in nginx/lua/canary_router.lua (request_id()).
_SANE = re.compile(rb"[A-Za-z0-9._:-]{1,%d}" % MAX_LENGTH)


def new_request_id() -> str:
    """32 random hex digits (nginx's `$request_id` has the same form)."""
    return os.urandom(16).hex()


def sane_request_id(value: bytes | str | None) -> str | None:
    """`value` if it is a usable id (1-128 characters of A-Z a-z 0-9 . _ : -), else None."""
    if value is None:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw.decode("ascii") if _SANE.fullmatch(raw) else None


def request_id_from(value: bytes | str | None) -> str:
    """The caller's id when sane, a new one otherwise."""
    return sane_request_id(value) or new_request_id()

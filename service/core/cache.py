"""The response cache: `ResponseCache` interface, `NullCache`, and the Redis-backed `RedisCache`.

Keys carry model name + model version + the model file's sha256 + a digest of the canonical
inputs and the requested outputs, so blue and green sharing one Redis (or an fp32 and an int8
build of one version) never serve each other's answers. Entries are sealed with an HMAC over
key and value (`seal`/`unseal`): whoever can write to Redis cannot choose the answers, nor move
a genuine answer to another key. `RedisCache` fails open behind a circuit breaker: a Redis
fault costs misses, never an error or a hang.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "canary:v2"  # v2: sealed entries, keys with the model's sha256
_MAGIC = b"CNRY\x01"  # format tag + framing version
_COUNT = struct.Struct("<I")
_DIM = struct.Struct("<Q")
_UNSUPPORTED_KINDS = "OV"  # object arrays hold pointers, structured dtypes lose fields in .str
_MAC_SIZE = hashlib.sha256().digest_size


class RejectedEntry(ValueError):
    """A cache entry that must not be served; `reason` is a metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ResponseCache(Protocol):
    """What the batch function needs from a cache. Implementations never raise on a fault."""

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """One entry per key, in order; a miss is `None`."""

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store `(key, value)` pairs, best effort."""


class NullCache:
    """The cache switched off: always misses, stores nothing."""

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [None] * len(keys)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        return None


def _checked(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind in _UNSUPPORTED_KINDS:
        raise ValueError(f"dtype {array.dtype} cannot be cached")
    return array


def cache_key(
    model: str, version: str, model_sha256: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
) -> str:
    """Key for one request: model, version, model file sha256, a digest of inputs and outputs.

    The model's sha256 keeps two builds of one registry version (fp32, int8) apart; its first
    12 hex digits also show in the key, for whoever inspects Redis. Inputs are hashed sorted
    by name as (name, dtype string, shape, C-order bytes), so the memory layout and dict order
    do not matter; the requested outputs keep their order.
    """
    digest = hashlib.sha256()

    def field(data: bytes) -> None:  # length-prefixed, so no two field lists hash alike
        digest.update(_DIM.pack(len(data)) + data)

    for text in (model, version, model_sha256):  # also hashed: "a:b"/"c" and "a"/"b:c" must not collide
        field(text.encode())
    for name in sorted(inputs):
        array = _checked(inputs[name])
        field(name.encode())
        field(array.dtype.str.encode())
        field(repr(array.shape).encode())
        field(array.tobytes(order="C"))
    field(str(len(outputs)).encode())
    for name in outputs:
        field(name.encode())
    return f"{KEY_PREFIX}:{model}:{version}:{model_sha256[:12]}:{digest.hexdigest()}"


def _mac(secret: bytes, key: str, value: bytes) -> bytes:
    encoded = key.encode()
    return hmac.new(secret, _DIM.pack(len(encoded)) + encoded + value, hashlib.sha256).digest()


def seal(secret: bytes, key: str, value: bytes) -> bytes:
    """`value` prefixed with HMAC-SHA256(secret, key + value): only holders of `secret` can
    write an entry `unseal` accepts, and only under the key it was written for."""
    return _mac(secret, key, value) + value


def unseal(secret: bytes, key: str, blob: bytes) -> bytes:
    """The value `seal` wrapped for `key`; RejectedEntry("signature") if the MAC does not verify."""
    mac, value = blob[:_MAC_SIZE], blob[_MAC_SIZE:]
    if len(mac) != _MAC_SIZE or not hmac.compare_digest(mac, _mac(secret, key, value)):
        raise RejectedEntry("signature", "cache entry signature does not verify")
    return value


def encode_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    """Frame arrays as magic, count, then per array: dtype string, shape, C-order bytes."""
    parts = [_MAGIC, _COUNT.pack(len(arrays))]
    for array in map(_checked, arrays):
        dtype = array.dtype.str.encode()
        parts += [bytes([len(dtype)]), dtype, bytes([array.ndim])]
        parts += [_DIM.pack(d) for d in array.shape]
        data = array.tobytes(order="C")
        parts += [_DIM.pack(len(data)), data]
    return b"".join(parts)


def decode_arrays(blob: bytes) -> list[np.ndarray]:
    """Inverse of `encode_arrays`; raise ValueError on anything it did not produce."""
    view = memoryview(blob)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise ValueError("truncated cache entry")
        pos += n
        return view[pos - n : pos]

    if bytes(take(len(_MAGIC))) != _MAGIC:
        raise ValueError("not a cache entry")
    arrays = []
    for _ in range(_COUNT.unpack(take(_COUNT.size))[0]):
        try:
            dtype = np.dtype(bytes(take(take(1)[0])).decode("ascii"))
        except (TypeError, UnicodeDecodeError) as exc:
            raise ValueError("bad dtype in cache entry") from exc
        shape = tuple(_DIM.unpack(take(_DIM.size))[0] for _ in range(take(1)[0]))
        data = take(_DIM.unpack(take(_DIM.size))[0])
        if dtype.kind in _UNSUPPORTED_KINDS or len(data) != dtype.itemsize * math.prod(shape):
            raise ValueError("inconsistent array in cache entry")
        arrays.append(np.frombuffer(data, dtype=dtype).reshape(shape).copy())
    if pos != len(view):
        raise ValueError("trailing bytes in cache entry")
    return arrays


class RedisCache:
    """`ResponseCache` on Redis: one MGET per get, one SET EX pipeline per put.

    Fails open: a Redis error, timeout or bad reply is counted as event "error", logged once
    per breaker opening, and answered as all-misses (get) or dropped (put). After
    `breaker_failures` consecutive failed calls the breaker opens and calls skip Redis; after
    `breaker_reset_s` one call probes it, and success closes the breaker again.
    `on_event(kind, n)` reports "error" and "skip" (oversized, not stored); hits and misses
    are the caller's to count, since only it can tell a usable entry from a rejected one.
    `password` is Redis' AUTH password (one in `url` wins). Construction does not connect; a
    malformed `url` raises ValueError.
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        ttl_seconds: int = 300,
        max_entry_bytes: int = 1 << 20,
        connect_timeout_s: float = 0.05,
        read_timeout_s: float = 0.05,
        breaker_failures: int = 3,
        breaker_reset_s: float = 2.0,
        on_event: Callable[[str, int], None] | None = None,
    ) -> None:
        if ttl_seconds < 1 or max_entry_bytes < 1 or breaker_failures < 1 or breaker_reset_s < 0:
            raise ValueError("ttl_seconds, max_entry_bytes, breaker_failures must be >= 1, breaker_reset_s >= 0")
        self.ttl_seconds, self.max_entry_bytes = ttl_seconds, max_entry_bytes
        self.breaker_failures, self.breaker_reset_s = breaker_failures, breaker_reset_s
        self._on_event = on_event
        # No client-side retries: the breaker decides when Redis is worth another try.
        self._client = redis.Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=read_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._lock = threading.Lock()
        self._state, self._failures, self._opened_at = "closed", 0, 0.0

    @property
    def state(self) -> str:
        """Breaker state: "closed", "open" or "half-open" (a probe is in flight)."""
        return self._state

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self._call(lambda: self._mget(keys)) or [None] * len(keys)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        fitting = [(k, v) for k, v in items if len(v) <= self.max_entry_bytes]
        self._emit("skip", len(items) - len(fitting))
        if fitting:
            self._call(lambda: self._set_all(fitting))

    def close(self) -> None:
        """Release the connection pool (the cache stays usable: connections reopen on demand)."""
        self._client.close()

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        reply = self._client.mget(keys)
        if len(reply) != len(keys) or not all(v is None or isinstance(v, bytes) for v in reply):
            raise redis.ResponseError(f"malformed MGET reply for {len(keys)} keys")
        return [v if isinstance(v, bytes) else None for v in reply]

    def _set_all(self, items: list[tuple[str, bytes]]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value, ex=self.ttl_seconds)
        return pipe.execute()

    # -- circuit breaker ----------------------------------------------------------------
    def _call(self, command: Callable[[], T]) -> T | None:
        """One Redis round trip behind the breaker; None when skipped or failed."""
        if not self._admit():
            return None
        try:
            result = command()
        except Exception as exc:  # fail open: whatever Redis does, the request goes on
            self._failed(exc)
            return None
        self._succeeded()
        return result

    def _admit(self) -> bool:
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and time.monotonic() - self._opened_at >= self.breaker_reset_s:
                self._state = "half-open"  # this caller is the one probe
                return True
            return False

    def _succeeded(self) -> None:
        with self._lock:
            if self._state != "closed":
                log.info("redis cache reachable again; breaker closed")
            self._state, self._failures = "closed", 0

    def _failed(self, exc: Exception) -> None:
        self._emit("error", 1)
        with self._lock:
            self._failures += 1
            opening = self._state == "closed" and self._failures >= self.breaker_failures
            if opening or self._state == "half-open":
                self._state, self._opened_at = "open", time.monotonic()
        if opening:
            log.warning("redis cache failing (%s: %s); breaker open, serving misses", type(exc).__name__, exc)
        else:
            log.debug("redis cache call failed: %r", exc)

    def _emit(self, kind: str, n: int) -> None:
        if n and self._on_event is not None:
            self._on_event(kind, n)

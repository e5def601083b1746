"""The response cache against a real redis-server: keys, hits, TTL, size limit, fail-open breaker,
sealing and AUTH."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from service.core.cache import (
    NullCache,
    RedisCache,
    RejectedEntry,
    cache_key,
    decode_arrays,
    encode_arrays,
    seal,
    unseal,
)
from tests.support.redis_server import RedisProcess, redis_server  # noqa: F401

SHA = "ab" * 32
PIXELS = {"input": np.arange(128, dtype=np.float32).reshape(2, 64)}
LOGITS = [np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)]
SLOW_S = 2.0  # "returns quickly" bound: generous, machines are noisy


def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.02)  # polling interval, bounded by the deadline


@pytest.fixture
def events() -> Counter[str]:
    return Counter()


@pytest.fixture
def make_cache(redis_server: RedisProcess, events: Counter[str]) -> Iterator[Callable[..., RedisCache]]:  # noqa: F811
    made: list[RedisCache] = []

    def make(**overrides: object) -> RedisCache:
        # Roomier timeouts than production so a loaded CI box does not fake an outage.
        options = {"connect_timeout_s": 0.5, "read_timeout_s": 0.5} | overrides
        made.append(RedisCache(redis_server.url, on_event=lambda kind, n: events.update({kind: n}), **options))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


def key(version: str = "3", **inputs: np.ndarray) -> str:
    return cache_key("digits", version, SHA, inputs or PIXELS, ["logits"])


def test_miss_then_hit_returns_identical_arrays(make_cache, events) -> None:
    cache = make_cache()
    assert cache.get_many([key()]) == [None]
    cache.put_many([(key(), encode_arrays(LOGITS))])
    (blob,) = cache.get_many([key()])
    (got,) = decode_arrays(blob)
    assert got.dtype == np.float32 and np.array_equal(got, LOGITS[0])
    assert not events  # hits and misses are the core's to count (it may reject an entry)


def test_key_changes_with_every_part_of_the_identity() -> None:
    x = PIXELS["input"]
    variants = [
        cache_key("digits", "3", SHA, PIXELS, ["logits"]),
        cache_key("digits", "3", "cd" * 32, PIXELS, ["logits"]),  # another build of version 3
        cache_key("digits", "3", SHA[:-1] + "c", PIXELS, ["logits"]),  # differs past the readable prefix
        cache_key("digits", "4", SHA, PIXELS, ["logits"]),
        cache_key("digits-b", "3", SHA, PIXELS, ["logits"]),
        cache_key("digits", "3", SHA, {"input": x + 1}, ["logits"]),
        cache_key("digits", "3", SHA, {"input": x.view(np.int32)}, ["logits"]),  # same bytes
        cache_key("digits", "3", SHA, {"input": x.reshape(4, 32)}, ["logits"]),
        cache_key("digits", "3", SHA, {"other": x}, ["logits"]),
        cache_key("digits", "3", SHA, PIXELS, ["probabilities"]),
        cache_key("digits", "3", SHA, PIXELS, ["logits", "probabilities"]),
        cache_key("digits", "3", SHA, PIXELS, ["probabilities", "logits"]),
        cache_key("digits", "3", SHA, PIXELS, []),
        cache_key("a:b", "c", SHA, PIXELS, []),
        cache_key("a", "b:c", SHA, PIXELS, []),
    ]
    assert len(set(variants)) == len(variants)


def test_key_ignores_memory_layout_and_input_order() -> None:
    x, y = PIXELS["input"], np.arange(3, dtype=np.int64)
    reference = cache_key("digits", "3", SHA, {"a": x, "b": y}, ["logits"])
    assert reference.startswith(f"canary:v2:digits:3:{SHA[:12]}:")
    assert cache_key("digits", "3", SHA, {"b": y.copy(), "a": np.asfortranarray(x)}, ["logits"]) == reference
    assert cache_key("digits", "3", SHA, {"a": np.hstack([x, x])[:, :64], "b": y}, ["logits"]) == reference


def test_blue_and_green_sharing_redis_do_not_serve_each_other(make_cache) -> None:
    blue, green = make_cache(), make_cache()
    blue.put_many([(key(version="3"), b"blue answer")])
    assert green.get_many([key(version="4")]) == [None]
    assert blue.get_many([key(version="3")]) == [b"blue answer"]


def test_stored_entries_expire_after_ttl(make_cache, redis_server) -> None:  # noqa: F811
    make_cache(ttl_seconds=120).put_many([(key(), b"x"), (key("4"), b"y")])
    with redis_server.client() as plain:
        assert [0 < plain.ttl(k) <= 120 for k in (key(), key("4"))] == [True, True]


def test_oversized_entries_are_skipped(make_cache, events) -> None:
    cache = make_cache(max_entry_bytes=100)
    cache.put_many([(key("small"), b"s" * 100), (key("big"), b"b" * 101)])
    assert cache.get_many([key("small"), key("big")]) == [b"s" * 100, None]
    assert events["skip"] == 1


def test_mixed_hits_and_misses_keep_positions(make_cache, events) -> None:
    cache = make_cache()
    cache.put_many([(key("1"), b"one"), (key("3"), b"three")])
    got = cache.get_many([key("0"), key("1"), key("2"), key("3"), key("1")])
    assert got == [None, b"one", None, b"three", b"one"]


def test_redis_killed_gives_quick_misses_then_open_breaker(make_cache, events, redis_server, caplog) -> None:  # noqa: F811
    cache = make_cache(breaker_failures=3, breaker_reset_s=600)
    cache.put_many([(key(), b"cached")])
    assert cache.get_many([key()]) == [b"cached"]  # a live pooled connection, then a crash
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="service.core.cache"):
        for _ in range(3):
            started = time.monotonic()
            assert cache.get_many([key(), key("4")]) == [None, None]
            assert time.monotonic() - started < SLOW_S
        assert (cache.state, events["error"]) == ("open", 3)
        for _ in range(5):  # open: no Redis call, so no new error
            assert cache.get_many([key()]) == [None]
            cache.put_many([(key(), b"dropped")])
    assert events["error"] == 3
    warnings = [r for r in caplog.records if r.name == "service.core.cache"]
    assert len(warnings) == 1, "one warning per opening, not one per call"
    redis_server.restart()
    with redis_server.client() as plain:
        plain.set(key(), b"fresh")
        assert cache.get_many([key()]) == [None]  # still open: Redis is not asked
        assert "cmdstat_mget" not in plain.info("commandstats")


def test_hits_resume_after_redis_comes_back(make_cache, events, redis_server) -> None:  # noqa: F811
    cache = make_cache(breaker_failures=2, breaker_reset_s=0.2)
    redis_server.kill()
    for _ in range(2):
        cache.get_many([key()])
    assert cache.state == "open"
    redis_server.restart()  # empty: the entry must be stored again once the breaker lets us

    def put_then_hit() -> bool:
        cache.put_many([(key(), b"again")])
        return cache.get_many([key()]) == [b"again"]

    until(put_then_hit)
    assert cache.state == "closed"


def test_failed_probe_reopens_breaker(make_cache, events, redis_server) -> None:  # noqa: F811
    cache = make_cache(breaker_failures=1, breaker_reset_s=0.2)
    redis_server.kill()
    assert cache.get_many([key()]) == [None] and cache.state == "open"
    until(lambda: cache.get_many([key()]) == [None] and events["error"] >= 2)
    assert (cache.state, events["error"]) == ("open", 2)


def test_hung_redis_times_out_instead_of_hanging(make_cache, events, redis_server) -> None:  # noqa: F811
    cache = make_cache(connect_timeout_s=0.2, read_timeout_s=0.2)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert cache.get_many([key()]) == [None]
        cache.put_many([(key(), b"x")])
        assert time.monotonic() - started < SLOW_S
        assert events["error"] == 2
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)


def test_null_cache_never_hits() -> None:
    cache = NullCache()
    cache.put_many([(key(), b"x")])
    assert cache.get_many([key(), key("4")]) == [None, None]


@pytest.mark.parametrize(
    "arrays",
    [
        [],
        LOGITS,
        [np.array(3.5), np.zeros((0, 3), dtype=np.int64), np.array([True, False])],
        [np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4)), np.arange(4, dtype=">i4")],
        [np.array(["a", "héllo"]), np.array([1 + 2j], dtype=np.complex64), np.ones((2, 1, 3), np.float16)],
    ],
)
def test_encode_decode_round_trip(arrays: list[np.ndarray]) -> None:
    decoded = decode_arrays(encode_arrays(arrays))
    assert len(decoded) == len(arrays)
    for got, want in zip(decoded, arrays, strict=True):
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert np.array_equal(got, want)


GOOD = encode_arrays(LOGITS)
INTS = encode_arrays([np.arange(2, dtype="<i8")])


@pytest.mark.parametrize(
    "blob",
    [b"", b"garbage", GOOD[:-1], GOOD + b"\0", b"XXXX" + GOOD[4:],
     GOOD.replace(b"<f4", b"zz9"), GOOD.replace(b"<f4", b"<f8"),
     INTS.replace(b"<i8", b"|O8"), INTS.replace(b"<i8", b"|V8")],
    ids=["empty", "text", "truncated", "trailing", "magic", "dtype", "size", "object", "void"],
)  # fmt: skip
def test_decode_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(ValueError):
        decode_arrays(blob)


# -- sealing and AUTH ----------------------------------------------------------------------


def test_a_sealed_entry_opens_only_with_its_secret_and_under_its_key() -> None:
    value = encode_arrays(LOGITS)
    blob = seal(b"deployment key", key(), value)
    assert unseal(b"deployment key", key(), blob) == value
    forged = blob[:32] + encode_arrays([LOGITS[0] + 1])  # right key, the old MAC, other logits
    for secret, entry_key, entry in [
        (b"another key", key(), blob),  # sealed by another deployment (or an attacker's guess)
        (b"deployment key", key("4"), blob),  # a genuine entry moved to another key
        (b"deployment key", key(), forged),
        (b"deployment key", key(), value),  # unsealed, as anyone with Redis access can write
        (b"deployment key", key(), b""),
    ]:
        with pytest.raises(RejectedEntry, match="^cache entry signature does not verify$") as caught:
            unseal(secret, entry_key, entry)
        assert caught.value.reason == "signature"


def test_redis_with_a_password_refuses_a_client_without_it() -> None:
    with RedisProcess(password="s3cret-for-this-test") as server:
        events: Counter[str] = Counter()
        anonymous = RedisCache(
            server.url, connect_timeout_s=0.5, read_timeout_s=0.5, on_event=lambda kind, n: events.update({kind: n})
        )
        anonymous.put_many([(key(), b"x")])
        assert anonymous.get_many([key()]) == [None]  # refused: counted as errors, served as misses
        assert events["error"] == 2
        with server.client() as admin:
            assert admin.dbsize() == 0
        trusted = RedisCache(server.url, password="s3cret-for-this-test", connect_timeout_s=0.5, read_timeout_s=0.5)
        trusted.put_many([(key(), b"x")])
        assert trusted.get_many([key()]) == [b"x"]
        for cache in (anonymous, trusted):
            cache.close()

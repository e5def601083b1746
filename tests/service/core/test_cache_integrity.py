"""Cache integrity through the real core (tiny ONNX model) and a real redis-server: a poisoned,
moved, foreign or malformed entry is never served, and every refusal is counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.core.cache import RedisCache, decode_arrays, encode_arrays, seal
from service.core.inference import InferenceCore
from service.core.observer import CoreObserver
from service.core.tensors import InferRequest, InferTensor
from tests.support.redis_server import RedisProcess, redis_server  # noqa: F401
from tests.support.tiny_model import digits_rows, tiny_core

SECRET = b"per-deployment cache key for tests"
MAC = 32  # bytes of HMAC-SHA256 in front of every entry


class Recording(CoreObserver):
    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def cache_event(self, kind: str, count: int) -> None:
        self.events[kind] += count

    def cache_rejected(self, reason: str, count: int) -> None:
        self.rejected[reason] += count


@pytest.fixture
def caches(redis_server: RedisProcess) -> Iterator[list[RedisCache]]:  # noqa: F811
    made: list[RedisCache] = []
    yield made
    for cache in made:
        cache.close()


def make_core(tmp_path: Path, redis_server: RedisProcess, caches: list, *, seed: int = 0, secret: bytes = SECRET):  # noqa: F811
    cache = RedisCache(redis_server.url, connect_timeout_s=0.5, read_timeout_s=0.5)
    caches.append(cache)
    observer = Recording()
    return tiny_core(tmp_path, seed=seed, cache=cache, cache_secret=secret, observer=observer), observer


def request(rows: np.ndarray, outputs: list[str] | None = None) -> InferRequest:
    return InferRequest("digits", None, [InferTensor("input", "FP32", rows.shape, rows.reshape(-1))], outputs)


def logits(core: InferenceCore, rows: np.ndarray) -> np.ndarray:
    return asyncio.run(core.infer(request(rows))).outputs[0].data


def only_key(redis_server: RedisProcess) -> str:  # noqa: F811
    with redis_server.client() as plain:
        (key,) = plain.keys("canary:*")
    return key.decode()


def rewrite(redis_server: RedisProcess, key: str, blob: bytes) -> None:  # noqa: F811
    with redis_server.client() as plain:
        plain.set(key, blob, keepttl=True)


ROWS = digits_rows(3)


def test_a_poisoned_entry_is_never_served_and_is_counted(tmp_path, redis_server, caches) -> None:  # noqa: F811
    core, seen = make_core(tmp_path, redis_server, caches)
    truth = logits(core, ROWS)
    key = only_key(redis_server)
    with redis_server.client() as plain:
        genuine = plain.get(key)
    (stored,) = decode_arrays(genuine[MAC:])
    assert np.array_equal(stored, truth)
    poisoned = -stored  # right key, right framing, dtype and shape: only the logits changed
    for blob in (
        genuine[:MAC] + encode_arrays([poisoned]),  # the genuine MAC kept
        seal(b"an attacker's guess", key, encode_arrays([poisoned])),  # sealed with another key
        encode_arrays([poisoned]),  # no seal at all
    ):
        rewrite(redis_server, key, blob)
        assert np.array_equal(logits(core, ROWS), truth)
    assert seen.rejected == {"signature": 3}
    assert seen.events == {"miss": 4}  # the first lookup and the three poisoned ones
    assert np.array_equal(logits(core, ROWS), truth) and seen.events["hit"] == 1  # re-stored, genuine


def test_an_entry_moved_to_another_requests_key_is_rejected(tmp_path, redis_server, caches) -> None:  # noqa: F811
    core, seen = make_core(tmp_path, redis_server, caches)
    logits(core, ROWS[:1])
    first = only_key(redis_server)
    with redis_server.client() as plain:
        genuine = plain.get(first)
        truth = logits(core, ROWS[1:2])  # now stored under a second key
        (second,) = {k.decode() for k in plain.keys("canary:*")} - {first}
        plain.set(second, genuine)  # a genuine answer, to the wrong question
    assert np.array_equal(logits(core, ROWS[1:2]), truth)
    assert seen.rejected == {"signature": 1}


def test_another_build_of_the_same_version_never_reads_its_entries(tmp_path, redis_server, caches) -> None:  # noqa: F811
    fp32, _ = make_core(tmp_path, redis_server, caches, seed=0)
    other, seen = make_core(tmp_path, redis_server, caches, seed=1)  # same name and version, other file
    assert fp32.card.version == other.card.version and fp32.card.sha256 != other.card.sha256
    logits(fp32, ROWS)
    assert np.array_equal(logits(other, ROWS), np.asarray(other.runner.run({"input": ROWS}, ["logits"])[0]))
    assert seen.events == {"miss": 1} and not seen.rejected
    with redis_server.client() as plain:
        keys = sorted(k.decode() for k in plain.keys("canary:*"))
    assert [k.split(":")[4] for k in keys] == sorted(c.card.sha256[:12] for c in (fp32, other))


def test_slots_with_one_key_share_entries_and_other_keys_are_rejected(tmp_path, redis_server, caches) -> None:  # noqa: F811
    blue, _ = make_core(tmp_path, redis_server, caches)
    green, green_seen = make_core(tmp_path, redis_server, caches)
    foreign, foreign_seen = make_core(tmp_path, redis_server, caches, secret=b"another deployment's key")
    truth = logits(blue, ROWS)
    assert np.array_equal(logits(green, ROWS), truth) and green_seen.events == {"hit": 1}
    assert np.array_equal(logits(foreign, ROWS), truth)
    assert foreign_seen.events == {"miss": 1} and foreign_seen.rejected == {"signature": 1}


@pytest.mark.parametrize(
    ("answer", "outputs", "reason"),
    [
        (lambda truth: encode_arrays([truth[:2]]), None, "mismatch"),  # 2 rows for a 3-row request
        (lambda truth: encode_arrays([truth.astype(np.float64)]), None, "mismatch"),  # dtype
        (lambda truth: encode_arrays([truth[:, :5]]), None, "mismatch"),  # shape [-1, 10] per the card
        (lambda truth: encode_arrays([truth.reshape(-1)]), None, "mismatch"),  # rank
        (lambda truth: encode_arrays([truth, truth]), None, "mismatch"),  # one array per output
        (lambda truth: encode_arrays([]), ["logits"], "mismatch"),
        (lambda truth: encode_arrays([truth])[:-1], None, "format"),
    ],
    ids=["rows", "dtype", "shape", "rank", "extra", "none", "truncated"],
)
def test_a_sealed_entry_that_does_not_answer_the_request_is_a_miss(
    tmp_path,
    redis_server,  # noqa: F811
    caches,
    answer,
    outputs,
    reason,
) -> None:
    """Even sealed with the deployment's key (a leaked key, a bug), only an answer of the card's
    dtype and shape with the request's rows is served."""
    core, seen = make_core(tmp_path, redis_server, caches)
    truth = asyncio.run(core.infer(request(ROWS, outputs))).outputs[0].data
    key = only_key(redis_server)
    rewrite(redis_server, key, seal(SECRET, key, answer(truth)))
    again = asyncio.run(core.infer(request(ROWS, outputs))).outputs
    assert len(again) == 1 and np.array_equal(again[0].data, truth)
    assert seen.rejected == {reason: 1} and seen.events == {"miss": 2}


def test_without_a_configured_key_each_core_signs_with_its_own(tmp_path, redis_server, caches) -> None:  # noqa: F811
    cache = RedisCache(redis_server.url, connect_timeout_s=0.5, read_timeout_s=0.5)
    caches.append(cache)
    one, two = Recording(), Recording()
    first = tiny_core(tmp_path, cache=cache, observer=one)
    second = tiny_core(tmp_path, cache=cache, observer=two)
    logits(first, ROWS)
    logits(first, ROWS)
    logits(second, ROWS)
    assert one.events == {"miss": 1, "hit": 1} and two.rejected == {"signature": 1}


def test_a_hit_is_answered_while_a_model_call_runs(tmp_path, redis_server, caches):  # noqa: F811
    """The model is slow (400 ms a batch, injected): a request whose answer is cached is
    answered from the cache while another request's model call is still running, with the
    answer the model gave it before; the slow one then gets its own answer."""
    from service.core.faults import FaultPlan

    cache = RedisCache(redis_server.url, connect_timeout_s=0.5, read_timeout_s=0.5)
    caches.append(cache)
    observer = Recording()
    core = tiny_core(tmp_path, cache=cache, cache_secret=SECRET, observer=observer, faults=FaultPlan(latency_ms=400))
    x = digits_rows(2, seed=7)

    async def scenario() -> tuple[np.ndarray, np.ndarray, bool, np.ndarray]:
        first = (await core.infer(request(x[:1]))).outputs[0].data  # a miss: the model answers, cached
        slow = asyncio.create_task(core.infer(request(x[1:])))  # another miss: a 400 ms model call
        await asyncio.sleep(0.05)
        again = (await core.infer(request(x[:1]))).outputs[0].data
        running = not slow.done()
        return first, again, running, (await slow).outputs[0].data

    first, again, running, other = asyncio.run(scenario())
    assert running, "the cached answer waited for the running model call"
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(other, first) and observer.events == {"miss": 2, "hit": 1}

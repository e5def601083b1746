"""`AdaptiveBatcher`: merging, order, row limits, failure isolation, overload, cancel, close.

The batch function can hold the worker thread on a `threading.Event`, so the tests decide
exactly what is queued when a batch forms; waits are polls with a deadline, never sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from service.core.batching import AdaptiveBatcher
from service.core.errors import Unavailable

DEADLINE_S = 5.0


class Doubler:
    """A batch function that doubles each item and records every batch it is given.

    While `held`, calls block until `release()`, keeping the worker busy so later submits
    pile up in the queue. Items in `fail_in_slot` get a ValueError in their slot;
    a batch containing an item in `fail_whole` raises as a whole.
    """

    def __init__(self, held: bool = False, fail_in_slot: tuple[int, ...] = (), fail_whole: tuple[int, ...] = ()):
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self._gate = threading.Event()
        if not held:
            self._gate.set()
        self.fail_in_slot = fail_in_slot
        self.fail_whole = fail_whole

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.entered.set()
        # A timeout, so a broken test fails on its assertions instead of hanging the run.
        self._gate.wait(DEADLINE_S)
        if any(item in self.fail_whole for item in items):
            raise ValueError("the whole batch failed")
        return [ValueError(f"bad item {item}") if item in self.fail_in_slot else item * 2 for item in items]

    def release(self) -> None:
        self._gate.set()


class Recorder:
    """Collects `on_batch` and `on_reject` calls."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, float]] = []
        self.rejects = 0

    def on_batch(self, rows: int, items: int, seconds: float) -> None:
        self.batches.append((rows, items, seconds))

    def on_reject(self) -> None:
        self.rejects += 1


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S * 2))


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


async def hold_worker(batcher: AdaptiveBatcher[int, int], fn: Doubler) -> asyncio.Task[int]:
    """Submit a blocker item (1000) and return once the worker thread is busy with it."""
    blocker = asyncio.create_task(batcher.submit(1000, 1))
    await wait_until(lambda: fn.entered.is_set() and batcher.queue_rows == 0, "the worker is busy")
    return blocker


async def submit_all(batcher: AdaptiveBatcher[int, int], items: list[tuple[int, int]]) -> list[asyncio.Task[int]]:
    """Submit (item, rows) pairs as tasks and return once all of them are queued."""
    tasks = [asyncio.create_task(batcher.submit(item, rows)) for item, rows in items]
    total = sum(rows for _, rows in items)
    await wait_until(lambda: batcher.queue_rows == total, f"{total} rows are queued")
    return tasks


def test_concurrent_submits_merge_into_one_batch() -> None:
    async def scenario() -> None:
        fn, seen = Doubler(held=True), Recorder()
        batcher = AdaptiveBatcher(fn, max_batch_size=64, on_batch=seen.on_batch)
        blocker = await hold_worker(batcher, fn)
        tasks = await submit_all(batcher, [(item, 1) for item in range(1, 6)])
        fn.release()
        assert await asyncio.gather(blocker, *tasks) == [2000, 2, 4, 6, 8, 10]
        assert fn.batches == [[1000], [1, 2, 3, 4, 5]]
        assert [(rows, items) for rows, items, _ in seen.batches] == [(1, 1), (5, 5)]
        assert all(seconds > 0 for _, _, seconds in seen.batches)
        await batcher.close()

    run(scenario)


def test_results_reach_their_own_callers() -> None:
    async def scenario() -> None:
        fn = Doubler(held=True)
        batcher = AdaptiveBatcher(fn, max_batch_size=16)
        blocker = await hold_worker(batcher, fn)
        values = [37, 5, 91, 12, 64, 3, 58, 20, 77, 41, 8, 66, 29, 50, 14, 83, 2, 95, 33, 71]
        tasks = await submit_all(batcher, [(value, 1 + value % 3) for value in values])
        fn.release()
        assert await asyncio.gather(*tasks) == [value * 2 for value in values]
        assert await blocker == 2000
        assert max(len(batch) for batch in fn.batches) > 1  # mapping was exercised inside batches
        await batcher.close()

    run(scenario)


def test_batches_respect_max_rows_including_multi_row_items() -> None:
    async def scenario() -> None:
        fn, seen = Doubler(held=True), Recorder()
        batcher = AdaptiveBatcher(fn, max_batch_size=4, on_batch=seen.on_batch)
        blocker = await hold_worker(batcher, fn)
        # rows: 3 | 2+2 | 1 (the 5 does not fit behind it) | 5 alone (too big for any batch) | 1
        tasks = await submit_all(batcher, [(1, 3), (2, 2), (3, 2), (4, 1), (5, 5), (6, 1)])
        fn.release()
        assert await asyncio.gather(*tasks) == [2, 4, 6, 8, 10, 12]
        await blocker
        assert fn.batches[1:] == [[1], [2, 3], [4], [5], [6]]
        assert [rows for rows, _, _ in seen.batches[1:]] == [3, 4, 1, 5, 1]
        await batcher.close()

    run(scenario)


def test_an_item_failing_in_its_slot_fails_alone() -> None:
    async def scenario() -> None:
        fn = Doubler(held=True, fail_in_slot=(13,))
        batcher = AdaptiveBatcher(fn)
        blocker = await hold_worker(batcher, fn)
        good1, bad, good2 = await submit_all(batcher, [(1, 1), (13, 1), (3, 1)])
        fn.release()
        assert await good1 == 2 and await good2 == 6
        with pytest.raises(ValueError, match="bad item 13"):
            await bad
        assert fn.batches[1:] == [[1, 13, 3]]  # they shared a batch, and it ran once
        await blocker
        await batcher.close()

    run(scenario)


def test_a_batch_raising_as_a_whole_still_answers_the_good_items() -> None:
    async def scenario() -> None:
        fn = Doubler(held=True, fail_whole=(13,))
        batcher = AdaptiveBatcher(fn)
        blocker = await hold_worker(batcher, fn)
        good1, bad, good2 = await submit_all(batcher, [(1, 1), (13, 1), (3, 1)])
        fn.release()
        assert await good1 == 2 and await good2 == 6
        with pytest.raises(ValueError, match="whole batch failed"):
            await bad
        assert fn.batches[1:] == [[1, 13, 3], [1], [13], [3]]
        await blocker
        await batcher.close()

    run(scenario)


def test_a_wrong_result_count_fails_the_whole_batch() -> None:
    async def scenario() -> None:
        batcher: AdaptiveBatcher[int, int] = AdaptiveBatcher(lambda items: [item * 2 for item in items][:-1])
        tasks = [asyncio.create_task(batcher.submit(item, 1)) for item in (1, 2, 3)]
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            assert isinstance(outcome, RuntimeError) and "returned 2 results for 3 items" in str(outcome)
        await batcher.close()

    run(scenario)


def test_queue_overflow_rejects_at_once_and_queued_items_complete() -> None:
    async def scenario() -> None:
        fn, seen = Doubler(held=True), Recorder()
        batcher = AdaptiveBatcher(fn, max_queue_rows=4, on_reject=seen.on_reject)
        blocker = await hold_worker(batcher, fn)
        queued = await submit_all(batcher, [(1, 3), (2, 1)])  # exactly the limit is accepted
        # The worker is still held, so only an immediate rejection can finish within the timeout.
        with pytest.raises(Unavailable, match="^server is overloaded"):
            await asyncio.wait_for(batcher.submit(3, 1), DEADLINE_S / 2)
        assert seen.rejects == 1 and batcher.queue_rows == 4
        fn.release()
        assert await asyncio.gather(blocker, *queued) == [2000, 2, 4]
        assert 3 not in sum(fn.batches, [])  # rejected means never run
        await batcher.close()

    run(scenario)


@pytest.mark.parametrize(("max_latency_ms", "dispatched"), [(0, True), (60_000, False)])
def test_zero_latency_dispatches_a_lone_item_without_waiting(max_latency_ms: float, dispatched: bool) -> None:
    async def scenario() -> None:
        fn = Doubler()
        batcher = AdaptiveBatcher(fn, max_batch_size=2, max_latency_ms=max_latency_ms)
        lone = asyncio.create_task(batcher.submit(1, 1))
        # A few loop turns take microseconds: enough to dispatch, far too short for any timer.
        for _ in range(50):
            await asyncio.sleep(0)
        assert (batcher.queue_rows == 0) is dispatched
        if not dispatched:  # the long wait is for companions: one arriving fills the batch at once
            assert await batcher.submit(2, 1) == 4
        assert await lone == 2
        assert fn.batches == ([[1]] if dispatched else [[1, 2]])
        await batcher.close()

    run(scenario)


def test_a_lone_item_waits_no_longer_than_max_latency() -> None:
    async def scenario() -> None:
        batcher = AdaptiveBatcher(Doubler(), max_batch_size=64, max_latency_ms=200)
        started = time.monotonic()
        assert await batcher.submit(1, 1) == 2
        elapsed = time.monotonic() - started
        # It did wait for companions (timers never fire early), but then went alone.
        assert 0.19 <= elapsed < 0.2 + DEADLINE_S / 2
        await batcher.close()

    run(scenario)


def test_a_cancelled_submit_leaves_the_others_fine() -> None:
    async def scenario() -> None:
        fn = Doubler(held=True)
        batcher = AdaptiveBatcher(fn)
        blocker = await hold_worker(batcher, fn)
        first, gone, last = await submit_all(batcher, [(1, 1), (2, 2), (3, 1)])
        gone.cancel()
        await wait_until(lambda: batcher.queue_rows == 2, "the cancelled rows leave the queue")
        blocker.cancel()  # its batch is already running: the result must be dropped quietly
        fn.release()
        assert await first == 2 and await last == 6
        assert gone.cancelled() and blocker.cancelled()
        assert fn.batches == [[1000], [1, 3]]
        assert await batcher.submit(4, 1) == 8  # the worker survived
        await batcher.close()

    run(scenario)


def test_close_fails_pending_submits_with_unavailable() -> None:
    async def scenario() -> None:
        fn = Doubler(held=True)
        batcher = AdaptiveBatcher(fn)
        blocker = await hold_worker(batcher, fn)
        queued = await submit_all(batcher, [(1, 1), (2, 1)])
        await batcher.close()
        fn.release()
        for outcome in await asyncio.gather(blocker, *queued, return_exceptions=True):
            assert isinstance(outcome, Unavailable)
        assert batcher.queue_rows == 0
        with pytest.raises(Unavailable):
            await batcher.submit(3, 1)
        assert fn.batches == [[1000]]  # the queued items never reached the model

    run(scenario)


def test_close_while_waiting_for_companions_fails_the_item() -> None:
    async def scenario() -> None:
        fn = Doubler()
        batcher = AdaptiveBatcher(fn, max_latency_ms=60_000)
        lone = asyncio.create_task(batcher.submit(1, 1))
        await wait_until(lambda: batcher.queue_rows == 1, "the item is queued")
        await asyncio.wait_for(batcher.close(), DEADLINE_S)  # the worker's wait is cut short
        with pytest.raises(Unavailable):
            await lone
        assert fn.batches == []

    run(scenario)

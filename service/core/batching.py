"""`AdaptiveBatcher`: merges concurrent requests into batches for one pure batch function.

Policy "greedy, bounded wait": one worker thread runs the batch function, so model calls are
serialised per process and the next batch forms while one runs. When the worker is free it
takes queued items in FIFO order up to `max_batch_size` rows; if fewer rows are queued it waits
for companions, but never past `max_latency_ms` after the oldest item arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.core.errors import Unavailable

T = TypeVar("T")
R = TypeVar("R")
BatchFn = Callable[[list[T]], list[R | BaseException]]

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity equality: `deque.remove` must remove this very request
class _Pending(Generic[T]):
    item: T
    rows: int
    arrived: float
    future: asyncio.Future[Any]
    taken: bool = False  # left the queue (dispatched, or failed by close)


class AdaptiveBatcher(Generic[T, R]):
    """Runs `batch_fn` over batches of submitted items; each caller gets exactly its own result.

    `batch_fn(items) -> results` is pure and synchronous: N items in, N results out, same
    order, an item's failure is an exception object in its slot. If it raises as a whole, each
    item of that batch is re-run alone so only the failing ones fail; if it returns the wrong
    number of results, every item of the batch fails with `RuntimeError` (a bug, not a request).

    `max_batch_size` and `max_queue_rows` count rows, not requests; an item larger than
    `max_batch_size` runs alone. `on_batch(rows, items, seconds)` is called on the event loop
    after each batch, `on_reject()` on each overload rejection; their errors are only logged.
    """

    def __init__(
        self,
        batch_fn: BatchFn[T, R],
        *,
        max_batch_size: int = 64,
        max_latency_ms: float = 5.0,
        max_queue_rows: int = 2048,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_latency_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue_rows >= 1, max_latency_ms >= 0")
        self._batch_fn = batch_fn
        self._max_rows = max_batch_size
        self._max_wait = max_latency_ms / 1000
        self._max_queue_rows = max_queue_rows
        self._on_batch = on_batch
        self._on_reject = on_reject
        self._queue: deque[_Pending[T]] = deque()
        self._queued_rows = 0
        self._inflight: list[_Pending[T]] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        # One thread: model calls are serialised per process, and batches form while one runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")

    @property
    def queue_rows(self) -> int:
        """Rows waiting in the queue, not yet dispatched to the batch function."""
        return self._queued_rows

    async def submit(self, item: T, rows: int) -> R:
        """Queue `item` (holding `rows` rows) and return its result, or raise its exception.

        Raises `Unavailable` at once, without queueing, when the queue would exceed
        `max_queue_rows` or the batcher is closed. Cancelling the caller discards the result.
        """
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        if self._closed:
            raise Unavailable("server is shutting down")
        if self._queued_rows + rows > self._max_queue_rows:
            # Overload is explicit: shed load now so clients retry elsewhere, never block.
            _notify(self._on_reject)
            limit = self._max_queue_rows
            raise Unavailable(f"server is overloaded: {self._queued_rows} rows queued, limit {limit}")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            # First use, a worker that died, or a new event loop (tests reuse a core across
            # loops): start afresh on this loop; asyncio.Event binds to the loop it first waits on.
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="adaptive-batcher")
        pending: _Pending[T] = _Pending(item, rows, loop.time(), loop.create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        self._arrived.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client went away: give its room in the queue back; a taken result is dropped.
            if not pending.taken:
                self._queue.remove(pending)
                self._queued_rows -= rows
            elif pending.future.done() and not pending.future.cancelled():
                pending.future.exception()  # mark retrieved, so asyncio does not log it
            raise

    async def close(self) -> None:
        """Stop the worker; queued, in-flight and later submits get `Unavailable`.

        A running model call cannot be interrupted: it finishes in its thread, results discarded.
        """
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.wait([self._worker])  # unlike `await`, never raises the worker's cancel
        for pending in [*self._inflight, *self._queue]:
            pending.taken = True
            if not pending.future.done():
                pending.future.set_exception(Unavailable("server is shutting down"))
        self._queue.clear()
        self._queued_rows = 0
        self._inflight = []
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            self._inflight = batch
            items = [pending.item for pending in batch]
            results, seconds = await loop.run_in_executor(self._executor, self._run, items)
            self._inflight = []
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():  # cancelled by its caller: nobody wants this result
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
            _notify(self._on_batch, sum(pending.rows for pending in batch), len(batch), seconds)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Pending[T]]:
        while True:
            # Clear before looking, so an arrival after the look still wakes the wait below.
            self._arrived.clear()
            if not self._queue:
                await self._arrived.wait()
                continue
            wait = self._queue[0].arrived + self._max_wait - loop.time()
            if self._queued_rows < self._max_rows and wait > 0:  # wait for companions
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow close()'s cancel.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._arrived.wait()
                continue
            batch = self._take()
            if batch:  # empty only when every queued caller was cancelled meanwhile
                return batch

    def _take(self) -> list[_Pending[T]]:
        batch: list[_Pending[T]] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            # Strict FIFO: never skip ahead to a smaller item, so no request starves.
            if batch and rows + head.rows > self._max_rows:
                break
            self._queue.popleft()
            self._queued_rows -= head.rows
            head.taken = True
            if head.future.done():  # cancelled, but its handler has not run yet
                continue
            batch.append(head)
            rows += head.rows
        return batch

    def _run(self, items: list[T]) -> tuple[list[R | BaseException], float]:  # worker thread
        start = time.perf_counter()
        try:
            results = _checked(self._batch_fn(items), len(items))
        except Exception as exc:
            # One bad request must not fail its neighbours: run each item of the batch alone.
            results = [exc] if len(items) == 1 else [self._run_alone(item) for item in items]
        return results, time.perf_counter() - start

    def _run_alone(self, item: T) -> R | BaseException:
        try:
            return _checked(self._batch_fn([item]), 1)[0]
        except Exception as exc:
            return exc


def _checked(results: list[R | BaseException], n: int) -> list[R | BaseException]:
    """A wrong count is a bug in the batch function, not in a request: fail every item."""
    if len(results) != n:
        message = f"batch function returned {len(results)} results for {n} items"
        return [RuntimeError(message) for _ in range(n)]
    return results


def _notify(callback: Callable[..., None] | None, *args: Any) -> None:
    """Metrics hooks must never break serving: log their failures and carry on."""
    try:
        if callback is not None:
            callback(*args)
    except Exception:
        log.exception("batcher callback %r failed", callback)

"""The Bento's own V2 REST listener (uvicorn + httptools) in this process, on a free port,
serving a `V2RestApp` from an event loop of its own thread: the real listener without a Bento."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from service.v2.http_server import HttpEndpoint, start_http_server
from service.v2.rest import V2RestApp


async def cancel_leftovers() -> None:
    """End what a test's cores left on this loop (their batcher, which starts afresh on the
    next loop), so no pending task is destroyed with the closed loop."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def listening(app: V2RestApp, close_core: bool = False, **limits) -> Iterator[str]:
    """Serve `app` until the block ends; yields the base URL. `close_core` also closes the
    app's core (its batcher task) in the listener's loop at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="v2-rest-test-loop", daemon=True)
    thread.start()
    try:
        start = start_http_server(app, "127.0.0.1", 0, **limits)
        endpoint: HttpEndpoint = asyncio.run_coroutine_threadsafe(start, loop).result(20)
        try:
            yield f"http://127.0.0.1:{endpoint.port}"
        finally:
            asyncio.run_coroutine_threadsafe(endpoint.stop(0.5), loop).result(20)
            if close_core and app.core is not None:
                asyncio.run_coroutine_threadsafe(app.core.close(), loop).result(20)
            asyncio.run_coroutine_threadsafe(cancel_leftovers(), loop).result(20)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(20)
        loop.close()

"""Redis dies under load: every request is still answered; hits resume when it returns."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from models.data import load_split
from tests.support.metrics import scrape, total

pytestmark = pytest.mark.slow


def body(rows) -> dict:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}]}


def test_redis_killed_mid_run_costs_no_request_and_hits_resume(serving):
    x = load_split().x_test
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                rows = x[i % 40 : i % 40 + 2]  # repeats: hits while Redis lives
                statuses.append(client.post(f"{serving.url}/v2/models/digits/infer", json=body(rows)).status_code)
                i += 1

    errors_before = total(scrape(serving.url), "canary_cache_events_total", kind="error")
    worker = threading.Thread(target=load)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while len(statuses) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        serving.redis.kill()
        seen = len(statuses)
        while len(statuses) < seen + 100 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        errors_during = total(scrape(serving.url), "canary_cache_events_total", kind="error")
        serving.redis.restart()
        # The breaker probes again after its reset time: poll until hits come back.
        hits_at_restart = total(scrape(serving.url), "canary_cache_events_total", kind="hit")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if total(scrape(serving.url), "canary_cache_events_total", kind="hit") > hits_at_restart + 5:
                break
            time.sleep(0.2)
        hits_after = total(scrape(serving.url), "canary_cache_events_total", kind="hit")
    finally:
        stop.set()
        worker.join(timeout=60)
    assert len(statuses) > 150
    assert set(statuses) == {200}, "a request failed while Redis was down"
    assert errors_during > errors_before, "the outage was not counted"
    assert hits_after > hits_at_restart + 5, "hits did not resume after Redis returned"

"""Fault injection for tests and chaos drills: off by default, set only by environment at
start (`CANARY_SERVICE_FAULT_LATENCY_MS`, `CANARY_SERVICE_FAULT_ERROR_RATIO`,
`CANARY_SERVICE_FAULT_AFTER_REQUESTS`), never remotely.

Errors follow a counted schedule, not a random draw: of every run of requests after the
first `after_requests`, exactly `error_ratio` of them fail, evenly spread (request n fails
when floor(n * ratio) steps up). A test that injects 20% errors therefore sees 20%, every
run, and a fault that starts "after the smoke test" starts exactly there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from service.core.errors import InferenceError


class InjectedFault(InferenceError):
    """A deliberately failed request (500 / INTERNAL): what a broken model version looks like."""

    http_status = 500
    grpc_code = "INTERNAL"


@dataclass
class FaultPlan:
    latency_ms: float = 0.0  # added to every model batch, like a slower model
    error_ratio: float = 0.0  # share of requests failed with InjectedFault
    after_requests: int = 0  # requests answered normally before any error is injected
    _seen: int = 0

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.error_ratio > 0

    def slow_down(self) -> None:
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000)

    def maybe_fail(self) -> None:
        if self.error_ratio <= 0:
            return
        self._seen += 1
        n = self._seen - self.after_requests
        if n > 0 and math.floor(n * self.error_ratio) > math.floor((n - 1) * self.error_ratio):
            raise InjectedFault("injected fault (CANARY_SERVICE_FAULT_ERROR_RATIO)")

"""Fault injection for tests and chaos drills: off by default, set only by environment at
start (`CANARY_SERVICE_FAULT_LATENCY_MS`, `CANARY_SERVICE_FAULT_ERROR_RATIO`), never remotely."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from service.core.errors import InferenceError


class InjectedFault(InferenceError):
    """A deliberately failed request (500 / INTERNAL): what a broken model version looks like."""

    http_status = 500
    grpc_code = "INTERNAL"


@dataclass
class FaultPlan:
    latency_ms: float = 0.0  # added to every model batch, like a slower model
    error_ratio: float = 0.0  # share of requests failed with InjectedFault
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.error_ratio > 0

    def slow_down(self) -> None:
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000)

    def maybe_fail(self) -> None:
        if self.error_ratio > 0 and self._rng.random() < self.error_ratio:
            raise InjectedFault("injected fault (CANARY_SERVICE_FAULT_ERROR_RATIO)")

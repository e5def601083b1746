"""The live-traffic features on the benchmark's hot path: prediction log, input drift, shadow diff.

The `bento-predlog` contender serves with all three on, at their worst case for the slot:
every answer logged to a local Redis Stream, every row into the drift window (the model's
training reference, stored at export), and every REST request a shadow copy
(`X-Canary-Shadow: 1`, as nginx marks its mirror) under its own request id, compared after
each writer cycle with "stable's" answer to that id. Stable is not a second server here: its
answers are written to the same store beforehand through the store's own `write`, so each
copy finds its pair at the first lookup, as on a stack where stable logged it a moment earlier.
gRPC requests carry no ids from the load generator: on gRPC the row measures log and drift.

After the load, `closing_notes` reads the slot's own counters, so the report shows that the
features really ran (rows logged and dropped, rows in the drift window, copies compared).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.payloads import Payload

REQUEST_IDS = 50_000  # ids bench-0 .. bench-49999, reused in turn (each is paired within a writer cycle)
SHADOW_HEADER = ("X-Canary-Shadow", "1")
LOG_AND_DRIFT_NOTE = (
    "prediction log and input drift on (a stable slot's hot path): every answer logged to a local Redis Stream, "
    "every row into the drift window; the log's redis-server counts as server CPU"
)
LIVE_TRAFFIC_NOTE = (
    "prediction log, input drift and shadow diff on: every answer logged to a local Redis Stream, every row "
    f"into the drift window; every REST request a shadow copy under its own id (bench-0..{REQUEST_IDS - 1:,}, "
    "stable's answers seeded in the log), compared with stable's after each writer cycle; the log's "
    "redis-server counts as server CPU"
)


def metric(base_url: str, name: str) -> float:
    """Sum of one metric's samples on a slot's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def as_shadow_copies(payload: Payload) -> Payload:
    """The same request sent as nginx's mirror sends it, each under its own request id."""
    return dataclasses.replace(payload, headers=(*payload.headers, SHADOW_HEADER), request_ids=REQUEST_IDS)


def seed_stable_answers(store_url: str, model: str, rows: np.ndarray, count: int = REQUEST_IDS) -> None:
    """Stable's logged answers to bench-0 .. bench-<count-1>: the true classes of `rows`."""
    from models.data import load_split
    from service.sinks import open_store

    labels = [int(c) for c in load_split().y_test[: len(rows)]]
    store = open_store(store_url)
    try:
        for start in range(0, count, 5_000):
            store.write([_stable_row(f"bench-{k}", model, labels) for k in range(start, min(count, start + 5_000))])
    finally:
        store.close()


def _stable_row(request_id: str, model: str, classes: list[int]) -> dict[str, Any]:
    return {
        "request_id": request_id, "time": time.time(), "slot": "stable", "model": model, "model_version": "stable",
        "protocol": "rest", "shadow": False, "rows": len(classes), "classes": classes,
        "confidences": [0.9] * len(classes), "latency_ms": 3.0, "input_datatype": "FP32",
        "input_shape": [len(classes), 64], "input_sha256": "", "input_b64": None,
    }  # fmt: skip


def closing_notes(base_url: str) -> tuple[str, ...]:
    """What the slot's counters say the features did during the run."""
    m = {name: metric(base_url, f"canary_{name}") for name in (
        "prediction_log_written_total", "prediction_log_dropped_total", "input_drift_rows", "input_drift_psi",
        "shadow_rows_compared_total", "shadow_rows_agreed_total", "shadow_unmatched_total",
    )}  # fmt: skip
    return (
        f"prediction log: {m['prediction_log_written_total']:,.0f} rows written, "
        f"{m['prediction_log_dropped_total']:,.0f} dropped",
        f"input drift: {m['input_drift_rows']:,.0f} rows in the window, PSI {m['input_drift_psi']:.3f} "
        "(one digit repeated: a drifted input, by design)"
        if m["input_drift_rows"]
        else "input drift: off (the model has no training reference; re-run with --fresh)",
        f"shadow diff: {m['shadow_rows_compared_total']:,.0f} rows compared with stable's, "
        f"{m['shadow_rows_agreed_total']:,.0f} agreed, {m['shadow_unmatched_total']:,.0f} unmatched",
    )


@dataclass(frozen=True)
class InTurns:
    """Requests/s of the same Bento with the features off, with log and drift on (what a
    stable slot runs) and with the shadow diff on too (every request a shadow copy: the worst
    case), windows taken in turns: all three servers are up the whole time, so whatever else
    the machine does (a shared VM's neighbours, CPU frequency) falls on all alike."""

    off: tuple[float, ...]
    log_drift: tuple[float, ...]
    all_on: tuple[float, ...]
    seconds: float

    @staticmethod
    def _mean(values: tuple[float, ...]) -> float:
        return sum(values) / len(values)

    @property
    def ratio(self) -> float:
        """All three on against off: what the issue's target judges."""
        return self._mean(self.all_on) / self._mean(self.off)

    @property
    def log_drift_ratio(self) -> float:
        return self._mean(self.log_drift) / self._mean(self.off)

    def as_dict(self) -> dict[str, Any]:
        return {"off_rps": list(self.off), "log_drift_rps": list(self.log_drift), "all_on_rps": list(self.all_on),
                "seconds_per_window": self.seconds, "log_drift_on_off": round(self.log_drift_ratio, 3),
                "all_on_off": round(self.ratio, 3)}  # fmt: skip

    def markdown(self) -> str:
        windows = ", ".join(
            f"{a:,.0f}/{b:,.0f}/{c:,.0f}" for a, b, c in zip(self.off, self.log_drift, self.all_on, strict=True)
        )
        return (
            "### Prediction log, input drift and shadow diff: their cost, in turns\n\n"
            f"digits-cnn V2 REST JSON, the same Bento with them off, with log + drift on, and with all three on "
            f"(every request a shadow copy), {len(self.off)} rounds of {self.seconds:g} s windows taken in turns: "
            f"requests/s {windows}; mean log + drift / off = **{self.log_drift_ratio:.2f}**, "
            f"all three / off = **{self.ratio:.2f}**.\n"
        )


MODES = ("off", "log_drift", "all_on")


def in_turns_contenders() -> dict[str, Any]:
    """The three servers, by mode. Each has its own name: a server's log file and BENTOML_HOME
    (so its metrics files) are named after it."""
    from bench.contenders import ProjectBento

    return {
        "off": ProjectBento(),
        "log_drift": ProjectBento(name="bento-logdrift", prediction_log=True, shadow_copies=False),
        "all_on": ProjectBento(name="bento-predlog", prediction_log=True),
    }


def measure_in_turns(
    model: Any, ctx: Any, rounds: int, seconds: float, connections: int, workdir: Path, say: Callable[[str], None]
) -> InTurns:
    """The three Bentos up together, wrk on their V2 REST JSON endpoints in turns (the order
    rotates each round); one warm-up window each first."""
    from contextlib import ExitStack

    from bench.wrk import run_wrk

    contenders = in_turns_contenders()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    with ExitStack() as stack:
        served = {mode: stack.enter_context(c.serve(model, ctx)) for mode, c in contenders.items()}
        endpoint = {mode: next(e for e in s.endpoints if e.protocol == "rest-json") for mode, s in served.items()}
        for mode, e in endpoint.items():
            run_wrk(e.target, e.payload, workdir / f"warm-{mode}", 2, connections)
        for index in range(rounds):
            for mode in MODES[index % 3 :] + MODES[: index % 3]:
                e = endpoint[mode]
                result = run_wrk(e.target, e.payload, workdir / f"{mode}-{index}", seconds, connections)
                if result.errors:
                    raise RuntimeError(f"{result.errors} failed requests ({mode})")
                rates[mode].append(result.rps)
                say(f"    {mode:<9} window {index + 1}: {result.rps:,.0f} requests/s")
        for mode in ("log_drift", "all_on"):
            closing = served[mode].closing_notes
            for note in closing() if closing else ():
                say(f"    {mode}: {note}")
    return InTurns(tuple(rates["off"]), tuple(rates["log_drift"]), tuple(rates["all_on"]), seconds)

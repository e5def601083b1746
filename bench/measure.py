"""Step 3: one measured window against one endpoint, with the right load generator.

REST goes through wrk (a warm-up run first, then the measured run); gRPC at saturation
through h2load (C, `bench/h2grpc.py`), at a fixed offered load through the multi-process
`grpcload` (it paces each call). The server's process-tree CPU is read at the window's edges.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.contenders import Contender, Endpoint
from bench.cpu import machine_busy_seconds, tree_cpu_seconds
from bench.grpcload import STARTUP_S, run_grpc_load
from bench.h2grpc import h2load_path, run_h2load_grpc
from bench.h2grpc import shape as h2grpc_shape
from bench.results import Measurement
from bench.wrk import LoadResult, run_wrk

CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class CpuWindow:
    """CPU seconds burnt during a measured window: the server's tree and the whole machine."""

    server_s: float = 0.0
    machine_s: float = 0.0


def _cpu_now(pids: tuple[int, ...]) -> CpuWindow:
    return CpuWindow(sum(tree_cpu_seconds(pid) for pid in pids), machine_busy_seconds())


def _since(start: CpuWindow, end: CpuWindow) -> CpuWindow:
    return CpuWindow(end.server_s - start.server_s, end.machine_s - start.machine_s)


def _at(when: float, pids: tuple[int, ...], into: dict[str, CpuWindow], key: str) -> threading.Thread:
    """Read the CPU counters at wall-clock time `when`, in a thread."""

    def probe() -> None:
        time.sleep(max(0.0, when - time.time()))
        into[key] = _cpu_now(pids)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    return thread


def load_endpoint(
    endpoint: Endpoint,
    server_pids: tuple[int, ...],
    workdir: Path,
    *,
    duration_s: float,
    warmup_s: float,
    connections: int,
    grpc_processes: int,
    rate: float = 0.0,
) -> tuple[LoadResult, CpuWindow, str]:
    """Run the load; returns (result, CPU burnt in the window by the `server_pids` trees,
    load generator name)."""
    if endpoint.protocol == "grpc" and h2load_path():
        # h2load (C): at saturation the load generator is not what limits the server, and at a
        # fixed load its pacing adds no interpreter jitter to the p99
        before = _cpu_now(server_pids)
        result = run_h2load_grpc(endpoint.target, endpoint.payload, workdir, duration_s, connections, warmup_s, rate)
        clients, streams = h2grpc_shape(connections)
        paced = f" at {rate:,.0f}/s" if rate > 0 else ""
        return result, _since(before, _cpu_now(server_pids)), f"h2load {clients}x{streams}{paced}"
    if endpoint.protocol == "grpc":  # no h2load: grpcload (Python) paces each call
        start_at = time.time() + STARTUP_S
        window = (start_at + warmup_s, start_at + warmup_s + duration_s)
        cpu: dict[str, CpuWindow] = {}
        probes = [_at(window[0], server_pids, cpu, "start"), _at(window[1], server_pids, cpu, "end")]
        result = run_grpc_load(
            endpoint.target,
            endpoint.payload,
            workdir,
            duration_s,
            connections,
            grpc_processes,
            warmup_s,
            rate,
            start_at,
        )
        for probe in probes:
            probe.join(5)
        window_cpu = _since(cpu["start"], cpu["end"]) if len(cpu) == 2 else CpuWindow()
        return result, window_cpu, f"grpc.aio x{grpc_processes}"
    if warmup_s > 0:
        run_wrk(endpoint.target, endpoint.payload, workdir / "warmup", warmup_s, connections, rate)
    before = _cpu_now(server_pids)
    result = run_wrk(endpoint.target, endpoint.payload, workdir, duration_s, connections, rate)
    return result, _since(before, _cpu_now(server_pids)), "wrk"


def to_measurement(
    model: str, contender: Contender, endpoint: Endpoint, mode: str, connections: int,
    result: LoadResult, cpu: CpuWindow, loadgen: str, offered_rps: float | None = None,
) -> Measurement:  # fmt: skip
    span = result.duration_s or 1.0
    other = max(0.0, cpu.machine_s - cpu.server_s - result.loadgen_cpu_s)
    return Measurement(
        model=model,
        contender=contender.name,
        label=contender.label,
        kind=contender.kind,
        protocol=endpoint.protocol,
        mode=mode,
        connections=connections,
        rows_per_request=endpoint.payload.rows,
        requests=result.requests,
        duration_s=result.duration_s,
        p50_ms=result.p50_ms,
        p90_ms=result.p90_ms,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        errors=result.errors,
        statuses=dict(result.statuses),
        offered_rps=offered_rps,
        loadgen=loadgen,
        loadgen_cpu_share=result.loadgen_cpu_s / span / CORES,
        server_cpu_share=cpu.server_s / span / CORES,
        other_cpu_share=other / span / CORES,
        baseline=contender.baseline,
        server_cpu_s=cpu.server_s,
    )


def describe(m: Measurement) -> str:
    offered = f" (offered {m.offered_rps:,.0f})" if m.offered_rps else ""
    return (
        f"{m.rps:>8,.0f} req/s{offered}  p50 {m.p50_ms:6.1f} ms  p99 {m.p99_ms:6.1f} ms  errors {m.errors}"
        f"  CPU: load-gen {m.loadgen_cpu_share:.0%} server {m.server_cpu_share:.0%} other {m.other_cpu_share:.0%}"
    )

"""CPU accounting: what a load generator and a server process tree burnt during a run.

A load generator is our child, so `os.wait4` hands us its exact rusage when it exits.
A server's tree is read with psutil before and after the measured window.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    output: str
    cpu_s: float  # user + system seconds of the child (and its reaped children)
    wall_s: float


def run_accounted(
    argv: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ChildRun:
    """Run `argv` to completion; its stdout+stderr go to `log` (and are returned)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )
    deadline = started + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()  # our own child, by its pid
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.05)  # polling a child we started; bounded by the deadline
    process.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        process.returncode, log.read_text(errors="replace"), usage.ru_utime + usage.ru_stime, time.monotonic() - started
    )


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def tree_size(pid: int) -> int:
    """How many processes the tree rooted at `pid` has (server + its workers)."""
    import psutil

    try:
        return 1 + len(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return 0


def machine_busy_seconds() -> float:
    """CPU seconds every core has spent busy since boot (all processes, ours or not)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def others_busy_share(sample_s: float = 1.0) -> float:
    """Share of the machine that processes outside our own tree keep busy, over `sample_s`."""
    cores = os.cpu_count() or 1
    mine, machine = tree_cpu_seconds(os.getpid()), machine_busy_seconds()
    time.sleep(sample_s)  # a measurement interval, not a synchronisation
    other = (machine_busy_seconds() - machine) - (tree_cpu_seconds(os.getpid()) - mine)
    return max(0.0, other / sample_s / cores)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> tuple[float, float]:
    """Wait (at most `max_wait_s`) until other processes use less than `threshold` of the
    machine. Returns (seconds waited, last share seen). On a shared machine this keeps other
    people's test runs out of the measured windows when they pause."""
    started = time.monotonic()
    share = others_busy_share()
    while share >= threshold and time.monotonic() - started < max_wait_s:
        share = others_busy_share()
    return time.monotonic() - started, share

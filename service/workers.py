"""A slot's worker processes: how many, and whether all of them are ready.

A slot runs `workers` processes (BentoML spawns them), each with its own batcher, ONNX
Runtime session and prediction-log writer, all listening on the slot's V2 REST and gRPC
ports (SO_REUSEPORT: the kernel spreads connections over them) and writing their metrics to
BentoML's Prometheus multiprocess folder, which /metrics aggregates.

Readiness is the slot's, not one worker's: a readiness probe lands on whichever worker the
kernel picks, so each worker marks itself ready in a folder the slot's workers share (one
file per process id, under the temp folder, named after the parent process that spawned them
all) and every worker answers ready only when `expected` live workers did. Not BentoML's
Prometheus folder: every `bentoml serve` sharing a BentoML home empties that one at start.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil  # a BentoML dependency, so in every Bento

READY_FOLDER = "canary-ready"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(setting: int) -> int:
    """The worker count for a `workers` setting: 0 means one per available core."""
    return setting if setting > 0 else available_cores()


def shared_folder() -> Path:
    """The folder this worker and its siblings share: one per spawning (arbiter) process."""
    return Path(tempfile.gettempdir()) / READY_FOLDER / str(os.getppid())


class WorkerRoster:
    """Ready marks of a slot's workers: `mark_ready()` from each, `all_ready()` from any."""

    def __init__(self, folder: Path, expected: int) -> None:
        self.folder = folder
        self.expected = expected

    def mark_ready(self, pid: int | None = None) -> None:
        if self.expected <= 1:  # nobody to wait for: no file
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(pid or os.getpid())).touch()

    def withdraw(self, pid: int | None = None) -> None:
        """Remove this worker's mark (at shutdown); the folder goes with the last one."""
        if self.expected <= 1:
            return
        (self.folder / str(pid or os.getpid())).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # not empty (a sibling is still up) or already gone
            pass

    def ready_workers(self) -> int:
        """Live processes that marked themselves ready (a dead worker's mark does not count)."""
        if not self.folder.is_dir():
            return 0
        return sum(1 for mark in self.folder.iterdir() if mark.name.isdigit() and psutil.pid_exists(int(mark.name)))

    def all_ready(self) -> bool:
        """True with one worker (nothing to wait for) or once `expected` live workers are ready."""
        return self.expected <= 1 or self.ready_workers() >= self.expected

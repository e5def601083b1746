"""A slot's worker roster: the slot is ready only when every one of its live workers is."""

from __future__ import annotations

import os
import subprocess
import sys

from service.workers import WorkerRoster, available_cores, resolve_workers


def test_zero_workers_means_one_per_available_core():
    assert resolve_workers(0) == available_cores() == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3


def test_the_slot_is_ready_only_when_every_live_worker_marked_itself(tmp_path):
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        roster = WorkerRoster(tmp_path / "ready", expected=2)
        assert not roster.all_ready()  # nobody yet
        roster.mark_ready()
        assert roster.ready_workers() == 1 and not roster.all_ready()  # this worker alone is not the slot
        roster.mark_ready(sibling.pid)
        assert roster.all_ready()
        sibling.kill()
        sibling.wait(10)
        assert roster.ready_workers() == 1 and not roster.all_ready()  # a dead worker's mark does not count
    finally:
        if sibling.poll() is None:
            sibling.kill()
            sibling.wait(10)
    roster.withdraw(sibling.pid)
    roster.withdraw()
    assert not (tmp_path / "ready").exists()  # the last worker out removes the folder


def test_a_single_worker_waits_for_nobody_and_writes_nothing(tmp_path):
    roster = WorkerRoster(tmp_path / "ready", expected=1)
    assert roster.all_ready()
    roster.mark_ready()
    assert not (tmp_path / "ready").exists()

"""The local stack signals only processes it started: a pid is ours only while it runs the
process recorded at start (start time and command-line marker), so a pid the kernel reused
for someone else's process is never stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deploy.stack import LocalStack, StackSettings
from models.home import CanaryHome

MARKER = "import time; time.sleep(120)"


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", MARKER])


def test_a_recorded_process_is_ours_and_is_stopped(tmp_path: Path) -> None:
    stack = LocalStack(CanaryHome(home=tmp_path / "home"), StackSettings(name="pids"))
    child = sleeper()
    try:
        stack._record("worker", child.pid, MARKER)
        assert stack.process("worker").alive
        stack._stop("worker", timeout=10)
        assert child.wait(10) is not None and not stack.process("worker").alive
    finally:
        child.kill()


def test_a_reused_pid_running_the_same_command_is_not_ours_and_not_signalled(tmp_path: Path) -> None:
    """Someone else's process with our marker on its command line, under a pid we once
    recorded: the start time tells them apart."""
    stack = LocalStack(CanaryHome(home=tmp_path / "home"), StackSettings(name="pids"))
    stranger = sleeper()
    try:
        stack._record("worker", stranger.pid, MARKER)
        record = json.loads(stack._pid_file("worker").read_text())
        record["started"] -= 3600  # what we started an hour ago had this pid
        stack._pid_file("worker").write_text(json.dumps(record))
        assert not stack.process("worker").alive
        stack._stop("worker", timeout=2)
        assert stranger.poll() is None, "the stack signalled a process it did not start"
    finally:
        stranger.kill()
        stranger.wait(10)


def test_a_pid_running_another_command_is_not_ours(tmp_path: Path) -> None:
    stack = LocalStack(CanaryHome(home=tmp_path / "home"), StackSettings(name="pids"))
    other = sleeper()
    try:
        stack._record("worker", other.pid, "redis-server 127.0.0.1:6390")
        assert not stack.process("worker").alive
        stack._stop("worker", timeout=2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(10)


def test_a_marker_matches_whole_words_only(tmp_path: Path) -> None:
    """`serve digits-service:v1` must not claim a process serving `digits-service:v10`."""
    stack = LocalStack(CanaryHome(home=tmp_path / "home"), StackSettings(name="pids"))
    child = subprocess.Popen([sys.executable, "-c", MARKER, "serve", "digits-service:v10"])
    try:
        stack._record("slot-blue", child.pid, "serve digits-service:v1")
        assert not stack.process("slot-blue").alive
        stack._record("slot-blue", child.pid, "serve digits-service:v10")
        assert stack.process("slot-blue").alive
    finally:
        child.kill()
        child.wait(10)

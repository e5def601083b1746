"""Start and stop the processes the project owns (by pid), and wait on readiness.

Used by `canary demo`/`canary serve`, the tests' fixtures and later the local stack.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from models.errors import CanaryError


def free_port() -> int:
    """A loopback port nothing holds now, outside the kernel's ephemeral range.

    The port is bound later (a slot binds its listeners after loading its model). Port 0
    would give one from the ephemeral range, where every outgoing connection on the machine
    takes its local port: a long-lived client connection landing on it meanwhile made a
    slot's bind fail ('Address already in use', seen in `make chaos`). Outside the range,
    only another listener can take it."""
    low, high = _ephemeral_range()
    pool = [(1 << 14, low - 1), (high + 1, 65535)]  # 16384..: clear of the well-known services
    spans = [(a, b) for a, b in pool if b >= a]
    draw = secrets.SystemRandom()
    for _ in range(256):
        a, b = draw.choice(spans) if spans else (1024, 65535)
        port = draw.randint(a, b)
        if port in _GIVEN:  # a caller may not have bound the last few yet
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.append(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded machine: any
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_GIVEN: deque[int] = deque(maxlen=256)  # this process's latest answers


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (BentoML's workers run in sessions of their own, so a
    process group does not reach them)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal `pid` and every process below it (collected first, so none is missed)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def stop_tree(pid: int, exited: Callable[[], bool], timeout: float) -> None:
    """SIGTERM `pid` (BentoML then stops its workers), SIGKILL its whole tree if it lingers,
    and SIGKILL any worker that outlived it (BentoML's workers run in sessions of their own),
    waiting up to 5 s for those to be gone."""
    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not exited() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not exited():
        kill_tree(pid)
    for child in tree:  # psutil refuses a pid that now names another process
        with contextlib.suppress(psutil.Error):
            child.kill()
    # gone before returning: a caller checks the slot's ports right after. A zombie holds no
    # port (an init that does not reap may keep it for ever), so it counts as gone.
    deadline = time.monotonic() + 5
    while any(_running(child) for child in tree) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Child:
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop our child and everything it started (see `stop_tree`)."""
        if self.process.poll() is None:
            stop_tree(self.process.pid, lambda: self.process.poll() is not None, timeout)
            self.process.wait(5)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # our own process group, so a crash of ours can't orphan it
        )
    return Child(process, log)


def wait_http_ok(child: Child, url: str, timeout: float = 120.0) -> None:
    """Poll `url` until it answers 200; fail fast if the child dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise CanaryError(
                f"process {child.pid} exited with {child.process.returncode}; log {child.log}:\n{child.tail()}"
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise CanaryError(f"{url} was not ready after {timeout:.0f}s; log {child.log}")


def serving_home(shared: Path, name: str) -> Path:
    """A BENTOML_HOME of its own for one `bentoml serve`, sharing the model and Bento stores.

    Every `bentoml serve` wipes `$BENTOML_HOME/prometheus_multiproc_dir` when it starts, so
    two servers on one BENTOML_HOME (blue and green) would silently erase each other's
    metrics. Each server gets its own home whose `models` and `bentos` link to the shared ones.
    """
    home = shared.parent / "serving" / name
    home.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (shared / store).mkdir(parents=True, exist_ok=True)
        link = home / store
        if not link.is_symlink():
            link.symlink_to((shared / store).resolve(), target_is_directory=True)
    return home


@contextmanager
def served_bento(
    bento: str, port: int, log: Path, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """`bentoml serve <bento>` on `port` until the block ends; yields the base URL.

    The server gets its own BENTOML_HOME (see `serving_home`), named after its log file,
    and a free port for its V2 REST listener unless `env` names one
    (`CANARY_SERVICE_REST_PORT`): two Bentos never fight over the default 8000."""
    shared = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    env = {
        "BENTOML_HOME": str(serving_home(shared, log.stem)),
        "CANARY_SERVICE_REST_PORT": str(free_port()),
        **(env or {}),
    }
    child = spawn([venv_bin("bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)], log, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(child, f"{base}/v2/health/ready", timeout)
        yield base
    finally:
        child.stop()

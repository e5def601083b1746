"""A real `redis-server` for tests, on a free port, in its own temp dir, stopped by its pid.

Use the `redis_server` fixture (`from tests.support.redis_server import redis_server  # noqa: F401`)
or `RedisProcess` directly as a context manager; `RedisProcess(password=...)` requires AUTH
(set in a config file, not on the command line).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A port the kernel just handed out; another process may still take it before we bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_a_free_port(server, attempts: int = 3):
    """`server._launch()` on a fresh free port, a few tries in case another process grabs the
    port first; the server keeps the port in `server.port`."""
    for attempt in range(attempts):
        server.port = free_port()
        try:
            return server._launch()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class RedisProcess:
    """One redis-server child: no persistence, bound to 127.0.0.1, log in its temp dir."""

    def __init__(self, binary: str = REDIS_SERVER, ready_timeout_s: float = 10.0, password: str | None = None) -> None:
        self.binary = binary
        self.password = password
        self.ready_timeout_s = ready_timeout_s
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="canary-redis-"))

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis-server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("redis-server not started")
        return self.proc.pid

    def start(self) -> RedisProcess:
        """Start on a free port (a few tries, in case another process grabs the port first)."""
        return on_a_free_port(self)

    def restart(self) -> RedisProcess:
        """Stop, then start again on the same port (empty: nothing is persisted)."""
        self.stop()
        return self._launch()

    def stop(self) -> None:
        """Terminate our child (by its pid only) and wait for it; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """Crash it: SIGKILL, no shutdown, open connections are reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> redis.Redis:
        """A plain client for assertions (TTL, INFO) made beside the code under test."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2, socket_connect_timeout=2
        )

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _launch(self) -> RedisProcess:
        log_path = self.workdir / "redis.log"
        config = self.workdir / "redis.conf"
        config.write_text(f"requirepass {self.password}\n" if self.password else "")
        with log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [self.binary, str(config), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                cwd=self.workdir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + self.ready_timeout_s
        with self.client() as probe:
            while True:
                if self.proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{tail}")
                try:  # the pid check rules out a stranger that took the port first
                    if probe.info("server")["process_id"] == self.proc.pid:
                        return self
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} not answering PING")
                time.sleep(0.02)  # polling interval, bounded by the deadline above


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A fresh, empty redis-server for one test; always stopped afterwards."""
    with RedisProcess() as server:
        yield server

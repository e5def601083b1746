"""The benchmark's own child processes: stopping a server's whole tree, and a redis-server.

Everything here acts only on processes this run started, by pid.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.process import Child, free_port


def stop_tree(child: Child, timeout: float = 15.0) -> None:
    """Stop our child and any descendants it left behind (e.g. uvicorn under `mlflow models
    serve`): `Child.stop` signals the whole tree, collected before the child exits."""
    child.stop(timeout)


def new_children(before: set[int]) -> list[int]:
    """Pids of our direct children that were not there in `before`."""
    import psutil

    return [p.pid for p in psutil.Process().children() if p.pid not in before]


def own_children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children()}


@contextmanager
def redis_server(timeout_s: float = 10.0) -> Iterator[str]:
    """A throw-away redis-server on a free port (no persistence); yields its URL."""
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    port = free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    with open(workdir / "redis.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            try:
                if client.info("server")["process_id"] == process.pid:
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not answer within {timeout_s:.0f}s")
            time.sleep(0.05)  # readiness poll, bounded by the deadline
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_hits(url: str) -> tuple[int, int]:
    """(keyspace hits, misses) of the redis-server at `url`."""
    import redis

    stats = redis.Redis.from_url(url, socket_timeout=2).info("stats")
    return int(stats["keyspace_hits"]), int(stats["keyspace_misses"])

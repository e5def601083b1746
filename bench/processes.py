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


@contextmanager
def postgres_server(timeout_s: float = 60.0) -> Iterator[tuple[str, str]]:
    """A throw-away PostgreSQL (initdb in a temp dir, password auth, fsync off) on a free
    port; yields (URL without the password, password). As root it runs as the `postgres`
    system user (PostgreSQL refuses root). Binaries: Debian's newest /usr/lib/postgresql/*/bin."""
    import glob
    import os
    import pwd
    import secrets
    import signal

    import psycopg

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    bindir = Path(found[-1]).parent if found else Path(shutil.which("initdb") or "initdb").parent
    user = "postgres" if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    password = secrets.token_urlsafe(16)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    (workdir / "pw").write_text(password + "\n")
    if user is not None:
        os.chown(workdir / "pw", entry.pw_uid, entry.pw_gid)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(workdir / "data"), "-U", "canary", f"--pwfile={workdir / 'pw'}",
         "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
        check=True, capture_output=True, timeout=120, user=user, cwd=workdir,
    )  # fmt: skip
    port = free_port()
    argv = [str(bindir / "postgres"), "-D", str(workdir / "data"), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={workdir}", "-c", "fsync=off", "-c", "synchronous_commit=off"]  # fmt: skip
    with open(workdir / "postgres.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                                   user=user)  # fmt: skip
    url = f"postgresql://canary@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"postgres exited with {process.returncode}")
            try:
                psycopg.connect(url, password=password, connect_timeout=2).close()
                break
            except psycopg.Error:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres on port {port} did not accept connections within {timeout_s:.0f}s")
            time.sleep(0.1)  # readiness poll, bounded by the deadline
        yield url, password
    finally:
        process.send_signal(signal.SIGINT)  # fast shutdown
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

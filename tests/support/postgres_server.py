"""A real throwaway PostgreSQL for tests: `initdb` in a temp dir, `postgres` on a free port,
password authentication, stopped by its pid.

PostgreSQL refuses to run as root: when the tests run as root, the server (and initdb) run
as the `postgres` system user the Debian package creates, and the temp dir is handed to it.
Use the `postgres_server` fixture (module scope) or `PostgresProcess` as a context manager.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.redis_server import on_a_free_port

PASSWORD = "canary-test-password"  # noqa: S105 - a throwaway server's
USER = "canary"


def _bindir() -> Path | None:
    """Debian's newest /usr/lib/postgresql/<major>/bin, else wherever initdb is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PostgresProcess:
    """One `postgres` child bound to 127.0.0.1 on a free port, fsync off (a test's data)."""

    def __init__(self, ready_timeout_s: float = 60.0) -> None:
        bindir = _bindir()
        if bindir is None:
            pytest.fail("needs PostgreSQL (initdb, postgres): run `make setup` (Debian package postgresql)",
                        pytrace=False)  # fmt: skip
        self.bindir = bindir
        self.ready_timeout_s = ready_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="canary-postgres-"))
        self.data = self.workdir / "data"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        # as root: run as the postgres system user (PostgreSQL will not run as root)
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        """The URL without the password (pass it apart, as the slots do)."""
        if self.port is None:
            raise RuntimeError("postgres not started")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("postgres not started")
        return self.proc.pid

    def _as_owner(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        self._as_owner(self.workdir)
        password_file = self.workdir / "password"
        password_file.write_text(PASSWORD + "\n")
        self._as_owner(password_file)
        done = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=120, user=self.user, cwd=self.workdir,
        )  # fmt: skip
        password_file.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")

    def start(self) -> PostgresProcess:
        self._initdb()
        return on_a_free_port(self)

    def restart(self) -> PostgresProcess:
        """Stop, then start again on the same port with the same data."""
        self.stop()
        return self._launch()

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of our child only; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def connect(self) -> psycopg.Connection:
        """A plain connection for assertions made beside the code under test."""
        return psycopg.connect(self.url, password=PASSWORD, autocommit=True, connect_timeout=5)

    def __enter__(self) -> PostgresProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _launch(self) -> PostgresProcess:
        log_path = self.workdir / "postgres.log"
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.workdir}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=50", "-c", "shared_buffers=16MB"]  # fmt: skip
        with log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, user=self.user)  # fmt: skip
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                with self.connect() as conn:  # our server: its pid is our child's
                    if conn.execute("SELECT pg_postmaster_start_time() IS NOT NULL").fetchone():
                        backend = conn.execute("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
                        if backend.fetchone() == (str(self.data),):
                            return self
            except psycopg.Error:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres on port {self.port} not accepting connections")
            time.sleep(0.05)  # polling interval, bounded by the deadline above


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresProcess]:
    """A throwaway PostgreSQL for a test module; always stopped and removed afterwards."""
    with PostgresProcess() as server:
        yield server

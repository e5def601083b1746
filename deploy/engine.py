"""The container engine canary builds and runs images with: which one, and a Docker daemon
started when none runs.

`find_engine` takes Docker when a daemon answers, else starts `dockerd` (as root, like the
local stack starts Redis and nginx: its pid recorded with its start time in the state folder,
its log in the state folder's logs), else Podman (no daemon needed). Which `docker` client:
from Docker 23 on, the CLI builds with BuildKit only through its buildx plugin, and the
newer `docker` first on PATH on some machines has none, so a client is taken only if it has
buildx or is older than 23 (Debian's 20.10 `/usr/bin/docker` builds with BuildKit itself).
`probe_engine` answers the same question without starting anything (`canary doctor`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy.process import spawn, stop_tree
from models.errors import CanaryError
from models.home import CanaryHome

INSTALL_HINT = "run `make setup` as root (installs docker.io), or install Podman (apt-get install podman)"
DEBIAN_DOCKER = "/usr/bin/docker"


class EngineSettings(BaseSettings):
    """Which container engine canary uses (env prefix CANARY_ENGINE_)."""

    model_config = SettingsConfigDict(env_prefix="CANARY_ENGINE_", extra="ignore", frozen=True)

    kind: Literal["auto", "docker", "podman"] = Field(
        default="auto", description="auto: Docker if its daemon answers or can be started, else Podman."
    )
    docker: str = Field(
        default="", description="The docker client; empty: the first of `docker` on PATH and /usr/bin/docker that "
        "can build with BuildKit (has buildx, or is older than 23).",
    )  # fmt: skip
    dockerd: str = Field(default="dockerd", description="The daemon started when no Docker daemon answers.")
    autostart: bool = Field(default=True, description="Start dockerd (root only) when no Docker daemon answers.")
    start_timeout_s: float = Field(default=60.0, gt=0, description="How long a started dockerd may take to answer.")


@dataclass(frozen=True)
class Engine:
    """A container engine that answers: its kind, client and server version."""

    kind: str  # docker | podman
    client: str  # absolute path of the CLI every command goes through
    version: str  # the server's version (Podman: its own)
    started_pid: int | None = field(default=None, compare=False)  # a dockerd canary started

    def env(self) -> dict[str, str]:
        """The environment for builds and compose: BuildKit on, this client first on PATH."""
        path = f"{Path(self.client).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "DOCKER_BUILDKIT": "1", "PATH": path}

    def run(self, *args: str, timeout: float = 120.0, what: str = "") -> str:
        """`client args...`; its stdout, or one line saying what failed."""
        try:
            done = subprocess.run([self.client, *args], capture_output=True, text=True, timeout=timeout,
                                  env=self.env(), check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise CanaryError(f"`{self.kind} {' '.join(args[:2])}` took longer than {timeout:.0f}s") from None
        if done.returncode != 0:
            raise CanaryError(f"{what or f'{self.kind} {args[0]}'} failed: {last_line(done.stderr or done.stdout)}")
        return done.stdout

    def describe(self) -> str:
        started = f", daemon started by canary (pid {self.started_pid})" if self.started_pid else ""
        return f"{self.kind} {self.version} (client {self.client}{started})"


class DaemonRecord:
    """The dockerd canary started: pid file (pid, start time, command-line marker) and log."""

    MARKER = "dockerd"

    def __init__(self, home: CanaryHome) -> None:
        self.pid_file = home.home / "engine" / "dockerd.pid"
        self.log = home.logs / "engine" / "dockerd.log"

    def save(self, pid: int) -> None:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        started = psutil.Process(pid).create_time()
        self.pid_file.write_text(json.dumps({"pid": pid, "started": started, "marker": self.MARKER}))

    def alive_pid(self) -> int | None:
        """The recorded pid, only while it still is the dockerd we started (never a recycled pid)."""
        try:
            record = json.loads(self.pid_file.read_text())
            process = psutil.Process(record["pid"])
            ours = abs(process.create_time() - record["started"]) < 0.01 and any(
                Path(word).name == self.MARKER for word in process.cmdline()[:1]
            )
            return int(record["pid"]) if ours and process.status() != psutil.STATUS_ZOMBIE else None
        except (OSError, ValueError, KeyError, psutil.Error):
            return None

    def stop(self) -> bool:
        """Stop our dockerd (its containers stop with it); False if none of ours runs."""
        pid = self.alive_pid()
        if pid is not None:
            stop_tree(pid, lambda: self.alive_pid() is None, timeout=30.0)
        self.pid_file.unlink(missing_ok=True)
        return pid is not None


def find_engine(home: CanaryHome, settings: EngineSettings | None = None, say=lambda line: None) -> Engine:
    """The engine to use, starting dockerd when allowed and needed; else one line saying why none."""
    settings = settings or EngineSettings()
    found, reasons = probe_engine(home, settings)
    if found:
        return found
    client = docker_client(settings)
    if settings.kind != "podman" and client and settings.autostart:
        started = _start_dockerd(home, settings, client, say)
        if started:
            return started
    raise CanaryError(f"no container engine: {'; '.join(reasons)}; {INSTALL_HINT}")


def probe_engine(home: CanaryHome, settings: EngineSettings | None = None) -> tuple[Engine | None, list[str]]:
    """The engine that answers now (nothing is started), or the reasons none does."""
    settings = settings or EngineSettings()
    reasons: list[str] = []
    if settings.kind in ("auto", "docker"):
        client = docker_client(settings)
        if client is None:
            reasons.append("no docker client that builds with BuildKit (docker.io, or a docker with buildx)")
        else:
            version, why = _server_version(client, "version", "{{.Server.Version}}")
            if version:
                return Engine("docker", client, version, DaemonRecord(home).alive_pid()), []
            reasons.append(f"docker: {why}")
    if settings.kind in ("auto", "podman"):
        podman = shutil.which("podman")
        version, why = _server_version(podman, "info", "{{.Version.Version}}") if podman else ("", "not installed")
        if podman and version:
            return Engine("podman", podman, version), []
        reasons.append(f"podman: {why}")
    return None, reasons


def docker_client(settings: EngineSettings) -> str | None:
    """The docker CLI that can build: the setting, else the first BuildKit-capable candidate."""
    if settings.docker:
        return shutil.which(settings.docker)
    candidates = [shutil.which("docker"), DEBIAN_DOCKER if Path(DEBIAN_DOCKER).exists() else None]
    for client in dict.fromkeys(c for c in candidates if c):
        if _builds_with_buildkit(client):
            return client
    return None


def _builds_with_buildkit(client: str) -> bool:
    try:
        version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout.strip()  # fmt: skip
        major = int(version.split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False
    if major < 23:
        return True
    buildx = subprocess.run([client, "buildx", "version"], capture_output=True, timeout=10, check=False)
    return buildx.returncode == 0


def _server_version(client: str, command: str, template: str) -> tuple[str, str]:
    """(server version, "") when the engine answers, else ("", why not). Docker: `version`,
    whose error says plainly that no daemon answers (`info --format` fails on its template)."""
    try:
        done = subprocess.run([client, command, "--format", template], capture_output=True, text=True, timeout=20,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "", "did not answer within 20s"
    version = done.stdout.strip()
    if done.returncode == 0 and version and "<no value>" not in version:
        return version, ""
    return "", last_line(done.stderr or done.stdout) or f"exit code {done.returncode}"


def _start_dockerd(home: CanaryHome, settings: EngineSettings, client: str, say) -> Engine | None:
    """Start dockerd (root only) and wait until it answers; None when it cannot be started."""
    dockerd = shutil.which(settings.dockerd)
    if dockerd is None or os.geteuid() != 0:
        return None
    record = DaemonRecord(home)
    child = None
    if record.alive_pid() is None:
        say(f"starting {dockerd} (log {record.log})")
        child = spawn([dockerd], record.log)
        record.save(child.pid)
    deadline = time.monotonic() + settings.start_timeout_s
    while time.monotonic() < deadline:
        # The child we started: ask it (the record's check can miss a process just started,
        # which is how a fresh-clone CI run saw "dockerd exited at start" of a running dockerd).
        pid = (None if child.process.poll() is not None else child.pid) if child else record.alive_pid()
        if pid is None:
            raise CanaryError(f"dockerd exited at start: {_tail(record.log)}; see {record.log}")
        version, _ = _server_version(client, "version", "{{.Server.Version}}")
        if version:
            return Engine("docker", client, version, pid)
        time.sleep(0.5)
    raise CanaryError(f"dockerd did not answer within {settings.start_timeout_s:.0f}s; see {record.log}")


def _tail(log: Path) -> str:
    try:
        return last_line(log.read_text(errors="replace"))
    except OSError:
        return "no log"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line.removeprefix("ERROR: ").removeprefix("Error: ")[:300]

"""`docker compose` for the compose target, on whatever compose the machine has.

`ComposeCli` runs `<compose> -p <project> -f <file> ...` and turns a missing engine or a
failed command into one line (`CanaryError`). By default it finds the engine first
(deploy/engine.py: starting dockerd when none runs) and its compose: the `docker compose`
plugin, else Debian's `docker-compose` 1.29, else Podman's. Only what every one of them
has is used: `up -d --no-deps`, `exec -T`, `stop`, `kill -s`, `ps -a -q` and `down`; container
states and health come from the engine's `inspect` (1.29 has no `ps --format json`), and
`wait_healthy` waits on the health checks itself (1.29 has no `up --wait`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from deploy.engine import Engine, EngineSettings, docker_client, find_engine, last_line
from deploy.stack import StackSettings
from models.errors import CanaryError
from models.home import REPO_ROOT, CanaryHome

COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
SERVICE_LABEL = "com.docker.compose.service"


class ComposeSettings(StackSettings):
    """Where `canary --target compose` works (env prefix CANARY_COMPOSE_); the nginx ports are
    the ones compose.yaml publishes on the host."""

    model_config = SettingsConfigDict(env_prefix="CANARY_COMPOSE_", extra="ignore", frozen=True)

    name: str = Field(default="compose", description="Folder of the compose stack's state in the state folder.")
    project: str = Field(default="bento-canary", description="Compose project name (-p).")
    compose_file: Path = Field(default=COMPOSE_DIR / "compose.yaml", description="The compose file.")
    extra_files: list[Path] = Field(
        default_factory=list, description="Compose files merged over compose_file, in order (JSON list), e.g. "
        "a slot's extra environment.",
    )  # fmt: skip
    docker: str = Field(
        default="", description="Empty: the engine's compose (found, and dockerd started, by canary). Else run "
        "as given: `docker` (`docker compose`), `podman`, or a `docker-compose` binary.",
    )  # fmt: skip
    blue_address: str = Field(default="172.28.0.11", description="Blue's fixed address on the compose network.")
    green_address: str = Field(default="172.28.0.12", description="Green's fixed address on the compose network.")
    rendered_dir: Path = Field(default=COMPOSE_DIR / "rendered", description="nginx.conf, routing and token for nginx.")
    wait_timeout_s: float = Field(default=300.0, gt=0, description="How long a service may take to get healthy.")
    observability: bool | None = Field(
        default=None, description="Start Prometheus and Grafana; unset: when both images are present in the engine.",
    )  # fmt: skip


def compose_command(engine: Engine) -> list[str] | None:
    """The compose that drives `engine`: its plugin (`docker compose`), else a standalone binary."""
    plugin = subprocess.run([engine.client, "compose", "version"], capture_output=True, timeout=30, check=False)
    if plugin.returncode == 0:
        return [engine.client, "compose"]
    standalone = shutil.which("docker-compose" if engine.kind == "docker" else "podman-compose")
    return [standalone] if standalone else None


class ComposeCli:
    """`<compose> -p <project> -f <file> ...`, one line of error on any failure."""

    def __init__(self, settings: ComposeSettings, home: CanaryHome | None = None) -> None:
        self.settings = settings
        self.home = home or CanaryHome()
        self._prefix: list[str] | None = None
        self._client: str | None = None
        self.engine: Engine | None = None  # found (or started) when `docker` is not set

    def _resolve(self) -> tuple[list[str], str]:
        """The compose command and the engine client (`inspect`, `logs`), found once."""
        if self._prefix is None or self._client is None:
            s = self.settings
            if s.docker:  # as configured: no engine is looked for or started
                binary = shutil.which(s.docker)
                if binary is None:
                    raise CanaryError(
                        f"no container engine: {s.docker!r} is not installed (the compose target needs Docker "
                        "with compose, or Podman); use --target local on this machine"
                    )
                standalone = Path(s.docker).name.endswith("-compose")
                self._prefix = [binary] if standalone else [binary, "compose"]
                self._client = (docker_client(EngineSettings()) or "docker") if standalone else binary
            else:
                engine = find_engine(self.home)
                prefix = compose_command(engine)
                if prefix is None:
                    raise CanaryError(f"{engine.kind} has no compose: run `make setup` (installs docker-compose)")
                self._prefix, self._client, self.engine = prefix, engine.client, engine
        return self._prefix, self._client

    def describe(self) -> str:
        """The engine and compose in use, for `status`."""
        prefix, _ = self._resolve()
        where = self.engine.describe() if self.engine else "as configured (CANARY_COMPOSE_DOCKER)"
        return f"{where}, compose {' '.join(prefix)}"

    def argv(self, *args: str) -> list[str]:
        prefix, _ = self._resolve()
        files = [arg for path in (self.settings.compose_file, *self.settings.extra_files) for arg in ("-f", str(path))]
        return [*prefix, "-p", self.settings.project, *files, *args]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600.0) -> str:
        argv = self.argv(*args)
        done = self._call(argv, env, timeout, f"{' '.join(args[:2])}")
        if done.returncode != 0:
            last = last_line(done.stderr + done.stdout) or f"exit code {done.returncode}"
            if "connect to the docker daemon" in last.lower() or "docker daemon" in last.lower():
                raise CanaryError(f"no container engine is running: {last}")
            raise CanaryError(f"docker compose {' '.join(args[:2])} failed: {last}")
        return done.stdout

    def _call(self, argv: list[str], env: dict[str, str] | None, timeout: float, what: str):
        try:
            return subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise CanaryError(f"`compose {what}` took longer than {timeout:.0f}s") from None
        except OSError as exc:  # the engine's client vanished or is not executable
            raise CanaryError(f"no container engine: {argv[0]}: {exc.strerror}") from None

    # -- containers, through the engine -----------------------------------------------------
    def states(self, env: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Each service's container: {"State", "Health" ("" without a check), "Name", "Id"};
        empty when compose or the engine cannot answer."""
        try:
            ids = self.run("ps", "-a", "-q", env=env).split()
        except CanaryError:
            return {}
        if not ids:
            return {}
        _, client = self._resolve()
        done = self._call([client, "inspect", *ids], None, 60, "inspect")
        if done.returncode != 0:
            return {}
        states = {}
        for item in json.loads(done.stdout or "[]"):
            state = item.get("State") or {}
            service = ((item.get("Config") or {}).get("Labels") or {}).get(SERVICE_LABEL, "")
            health = (state.get("Health") or {}).get("Status", "")
            states[service] = {"State": state.get("Status", ""), "Health": health, "Id": item.get("Id", ""),
                               "Name": str(item.get("Name", "")).lstrip("/"),
                               "ExitCode": state.get("ExitCode"), "Restarts": item.get("RestartCount", 0)}  # fmt: skip
        return states

    def wait_healthy(self, services: list[str], env: dict[str, str], timeout_s: float) -> None:
        """Until every service's container runs and passes its health check (if it has one);
        one line with the container's last log line as soon as one exits or turns unhealthy."""
        deadline = time.monotonic() + timeout_s
        while True:
            states, waiting = self.states(env), []
            for service in services:
                state = states.get(service)
                if state is None:
                    waiting.append(f"{service} has no container")
                elif state["State"] in ("exited", "dead") or state["Restarts"] or state["Health"] == "unhealthy":
                    why = f"{state['State']} (exit code {state['ExitCode']})"
                    if state["Restarts"]:
                        why = f"restarting (restarted {state['Restarts']}x, last exit code {state['ExitCode']})"
                    elif state["Health"] == "unhealthy":
                        why = "unhealthy"
                    raise CanaryError(f"{service}'s container is {why}: {self.last_log_line(state['Id'])}")
                elif state["State"] != "running" or state["Health"] not in ("healthy", ""):
                    waiting.append(f"{service} is {state['Health'] or state['State']}")
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise CanaryError(f"not healthy after {timeout_s:.0f}s: {', '.join(waiting)}")
            time.sleep(1.0)

    def last_log_line(self, container: str) -> str:
        _, client = self._resolve()
        done = self._call([client, "logs", "--tail", "20", container], None, 30, "logs")
        return last_line(done.stdout + done.stderr) or "no log"

    def image_present(self, image: str) -> bool:
        _, client = self._resolve()
        return self._call([client, "image", "inspect", image], None, 30, "image inspect").returncode == 0

"""`canary --target compose`: the release flow on the compose stack (`deploy/compose/`).

The same planner, state store, audit trail, nginx template and Lua router as the local
stack, by the same means: `ComposeStack` is a `LocalStack` whose slots and nginx are
compose services instead of local processes. A deploy starts the slot's container with its
Bento's image (`digits-service:v<N>`, from `canary containerize`), waits for its health check
and runs a smoke inference inside it before any traffic moves; weights, switches and
rollbacks go through nginx's admin API (published on the host's loopback, token in
`deploy/compose/rendered/admin.token`, mode 0600), so they apply within a second without a
reload. nginx's public ports are published on the stack's host (loopback unless
CANARY_COMPOSE_PUBLIC_HOST says otherwise); Grafana's admin password is generated (0600).

Every `docker compose` call goes through `ComposeCli`, which turns a missing engine or a
failed command into one line (`CanaryError`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from deploy.nginx import NginxController, NginxError, NginxLayout, NginxPorts, SlotAddress, ensure_token
from deploy.stack import LocalStack, StackSettings
from deploy.state import SLOTS, ReleaseState, SlotState
from models.errors import CanaryError
from models.home import REPO_ROOT, CanaryHome

COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
# Where the nginx container sees its mounts (deploy/compose/compose.yaml).
CONTAINER_RENDERED = Path("/etc/bento-canary/rendered")
CONTAINER_PREFIX = Path("/run/bento-canary")
CONTAINER_LAYOUT = NginxLayout(
    lua_dir=Path("/etc/bento-canary/nginx/lua"),
    modules_dir=None,  # OpenResty: Lua is built in
    admin_host="0.0.0.0",
    # Published-port traffic reaches the container from the network's gateway; Prometheus
    # scrapes /metrics from inside the network. The admin token guards every change.
    admin_allow=("127.0.0.1", "172.28.0.0/24"),
)
# Ports inside the slot containers (compose.yaml's x-bento-env).
SLOT_REST, SLOT_GRPC, SLOT_V2 = 3000, 50051, 8000
SMOKE_SCRIPT = """
import json, sys, urllib.request
rows = json.loads(sys.argv[1])
body = {"inputs": [{"name": "input", "shape": [len(rows), 64], "datatype": "FP32", "data": rows}]}
request = urllib.request.Request("http://127.0.0.1:%d/v2/models/digits/infer" % int(sys.argv[2]),
    data=json.dumps(body).encode(), headers={"content-type": "application/json"})
print(urllib.request.urlopen(request, timeout=30).read().decode())
"""


class ComposeSettings(StackSettings):
    """Where `canary --target compose` works (env prefix CANARY_COMPOSE_); the nginx ports are
    the ones compose.yaml publishes on the host."""

    model_config = SettingsConfigDict(env_prefix="CANARY_COMPOSE_", extra="ignore", frozen=True)

    name: str = Field(default="compose", description="Folder of the compose stack's state in the state folder.")
    project: str = Field(default="bento-canary", description="Compose project name (-p).")
    compose_file: Path = Field(default=COMPOSE_DIR / "compose.yaml", description="The compose file.")
    docker: str = Field(
        default="docker", description="`docker` (runs `docker compose`), `podman`, or a `docker-compose` binary."
    )
    blue_address: str = Field(default="172.28.0.11", description="Blue's fixed address on the compose network.")
    green_address: str = Field(default="172.28.0.12", description="Green's fixed address on the compose network.")
    rendered_dir: Path = Field(default=COMPOSE_DIR / "rendered", description="nginx.conf, routing and token for nginx.")
    wait_timeout_s: float = Field(default=300.0, gt=0, description="How long `up --wait` may take.")


class ComposeCli:
    """`docker compose -p <project> -f <file> ...`, one line of error on any failure."""

    def __init__(self, settings: ComposeSettings) -> None:
        self.settings = settings

    def argv(self, *args: str) -> list[str]:
        s = self.settings
        binary = shutil.which(s.docker) or s.docker
        base = [binary] if Path(s.docker).name == "docker-compose" else [binary, "compose"]
        return [*base, "-p", s.project, "-f", str(s.compose_file), *args]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600.0) -> str:
        argv = self.argv(*args)
        if shutil.which(argv[0]) is None:
            raise CanaryError(
                f"no container engine: {self.settings.docker!r} is not installed (the compose target needs "
                "Docker with the compose plugin, or set CANARY_COMPOSE_DOCKER); use --target local on this machine"
            )
        try:
            done = subprocess.run(
                argv, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise CanaryError(f"`{' '.join(argv[1:4])} {' '.join(args[:2])}` took longer than {timeout:.0f}s") from None
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit code {done.returncode}"
            if "Cannot connect to the Docker daemon" in last or "docker daemon" in last.lower():
                raise CanaryError(f"no container engine is running: {last}")
            raise CanaryError(f"docker compose {' '.join(args[:2])} failed: {last}")
        return done.stdout


def image_tag(bento: str) -> str:
    """digits-service:v3 -> v3 (the image tag `canary containerize` gives it)."""
    name, _, tag = bento.partition(":")
    if name != "digits-service" or not tag:
        raise CanaryError(f"the compose stack serves digits-service images; {bento!r} is not one")
    return tag


class ComposeStack(LocalStack):
    """The local stack's release flow with compose services for slots and nginx."""

    def __init__(self, home: CanaryHome, settings: ComposeSettings | None = None) -> None:
        self.compose_settings = settings or ComposeSettings()
        super().__init__(home, self.compose_settings)
        s = self.compose_settings
        self.cli = ComposeCli(s)
        self._ps: dict[str, dict[str, Any]] | None = None  # one `compose ps` per status call
        # nginx reads these three through its ./rendered mount
        self.rendered = s.rendered_dir
        self.routing_file = self.rendered / "routing.json"
        self.token_file = self.rendered / "admin.token"
        self.force_token_file = self.rendered / "force.token"
        self.grafana_password_file = self.folder / "grafana.password"  # Grafana's `admin` (0600)

    # -- what compose runs ----------------------------------------------------------------
    def _tags(self, state: ReleaseState) -> dict[str, str]:
        """BLUE_TAG / GREEN_TAG for compose: a slot with nothing deployed reuses the stable's
        tag (compose needs both to read the file; that slot is not started). Also where the
        public ports are published, and the Redis password, cache signing key and Grafana admin
        password, each from its 0600 file (compose.yaml demands them)."""
        stable = state.slots[state.stable].bento
        tags = {}
        for slot in SLOTS:
            bento = state.slots[slot].bento or stable
            if bento:
                tags[f"{slot.upper()}_TAG"] = image_tag(bento)
        s = self.compose_settings
        password, cache_key = self.cache_secrets()
        return {
            **tags,
            "CANARY_PUBLIC_HOST": s.nginx_public_host,
            "CANARY_REST_PORT": str(s.nginx_rest_port),
            "CANARY_GRPC_PORT": str(s.nginx_grpc_port),
            "CANARY_ADMIN_PORT": str(s.nginx_admin_port),
            "CANARY_REDIS_PASSWORD": password,
            "CANARY_CACHE_HMAC_KEY": cache_key,
            "CANARY_GRAFANA_PASSWORD": ensure_token(self.grafana_password_file),
        }

    def _slot_addresses(self) -> list[SlotAddress]:
        s = self.compose_settings
        return [SlotAddress(slot, getattr(s, f"{slot}_address"), SLOT_REST, SLOT_GRPC, SLOT_V2) for slot in SLOTS]

    def nginx(self) -> ComposeNginx:
        return ComposeNginx(
            self.folder / "nginx", self.compose_settings.nginx_admin_port,
            stop_service=lambda: self.cli.run("stop", "nginx", env=self._tags(self.store.load())),
        )  # fmt: skip

    # -- slots ----------------------------------------------------------------------------
    def start_slot(self, slot: str, bento: str, model_version: str) -> None:
        state = self.store.load()
        pending = state.with_changes(slots={**state.slots, slot: SlotState(bento, model_version)})
        timeout = str(int(self.compose_settings.wait_timeout_s))
        self.cli.run(
            "up", "-d", "--no-deps", "--wait", "--wait-timeout", timeout, slot,
            env=self._tags(pending), timeout=self.compose_settings.wait_timeout_s + 30,
        )  # fmt: skip
        try:
            self.smoke_test(slot, model_version, pending)
        except CanaryError:
            self.cli.run("stop", slot, env=self._tags(pending))
            raise

    def smoke_test(self, slot: str, model_version: str, state: ReleaseState | None = None) -> None:
        from models.data import load_split

        rows = load_split().x_test[:8].tolist()
        try:
            out = self.cli.run(
                "exec", "-T", slot, "python", "-c", SMOKE_SCRIPT, json.dumps(rows), str(SLOT_V2),
                env=self._tags(state or self.store.load()),
            )  # fmt: skip
        except CanaryError as exc:
            raise CanaryError(f"smoke inference on slot {slot} failed: {exc}") from None
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise CanaryError(f"smoke inference on slot {slot} failed: {out.strip()[:200]!r}") from None
        if answer.get("model_version") != model_version:
            raise CanaryError(
                f"smoke inference on slot {slot} answered version {answer.get('model_version')!r}, not {model_version}"
            )

    def stop_slot(self, slot: str) -> None:
        self.cli.run("stop", slot, env=self._tags(self.store.load()))

    # -- nginx ----------------------------------------------------------------------------
    def apply_nginx_config(self, state: ReleaseState) -> None:
        from deploy.nginx import render_config, write_routing_file

        self.rendered.mkdir(parents=True, exist_ok=True)
        for token in (self.token_file, self.force_token_file):
            ensure_token(token)
            # 0600 (also for a token an older version left 0644): the container's nginx reads
            # it in its master process, which runs as root (or, rootless, as this user).
            token.chmod(0o600)
        write_routing_file(self.routing_file, self._routing(state), self._slot_addresses())
        # Inside the container: the public listeners must take every interface there, or the
        # published ports (bound on the host to CANARY_PUBLIC_HOST, see compose.yaml) reach nothing.
        ports = NginxPorts(8080, 8081, 8079, public_host="0.0.0.0")
        generation = int(time.time() * 1000) % 2_000_000_000
        config = render_config(
            CONTAINER_PREFIX, ports, self._slot_addresses(), CONTAINER_RENDERED / "routing.json",
            CONTAINER_RENDERED / "admin.token", generation, layout=CONTAINER_LAYOUT,
            force_token_file=CONTAINER_RENDERED / "force.token",
        )  # fmt: skip
        (self.rendered / "nginx.conf").write_text(config)
        services = ["redis", "nginx", "prometheus", "grafana"]
        running = self.nginx().running()
        self.cli.run(
            "up", "-d", "--no-deps", "--wait", "--wait-timeout", str(int(self.compose_settings.wait_timeout_s)),
            *services, env=self._tags(state), timeout=self.compose_settings.wait_timeout_s + 30,
        )  # fmt: skip
        if running:  # a changed config on a running nginx: reload it (HUP), as locally
            self.cli.run("kill", "-s", "HUP", "nginx", env=self._tags(state))
        self.nginx().wait_for_generation(generation, self.token_file.read_text().strip())

    # -- the commands (`up`, `execute`, gate and rollout are LocalStack's) -------------------
    def _start_shared_services(self) -> None:
        """Redis starts with nginx (apply_nginx_config); compose reports taken ports itself."""

    def _slot_running(self, slot: str) -> bool:
        return self._service(slot).get("State") == "running"

    def down(self) -> list[str]:
        with self.store.locked():
            self.cli.run("down", env=self._tags(self.store.load()))
        return ["compose project " + self.compose_settings.project]

    # -- status (LocalStack.status, with one `compose ps` for the containers) ---------------
    def status(self) -> dict:
        self._ps = self._services(self.store.load())
        try:
            return super().status()
        finally:
            self._ps = None

    def _service(self, name: str) -> dict[str, Any]:
        ps = self._ps if self._ps is not None else self._services(self.store.load())
        return ps.get(name, {})

    def slot_metrics(self, slot: str) -> str:
        """The slot's /metrics, read inside its container (slots publish no host ports)."""
        from deploy.bake import MetricsUnavailable

        script = "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:3000/metrics',timeout=5).read().decode())"
        try:
            return self.cli.run(
                "exec", "-T", slot, "python", "-c", script, env=self._tags(self.store.load()), timeout=30
            )
        except CanaryError as exc:
            raise MetricsUnavailable(str(exc)) from None

    def slot_problem(self, slot: str) -> str | None:
        """Why `slot`'s container cannot serve now (compose's state and health check), or None."""
        service = self._services(self.store.load()).get(slot, {})
        if service.get("State") != "running":
            return f"slot {slot}'s container is {service.get('State') or 'gone'}"
        health = service.get("Health")
        return None if health in ("healthy", "", None) else f"slot {slot}'s container is {health}"

    def _slot_status(self, slot: str) -> dict:
        service = self._service(slot)
        return {
            "pid": None, "alive": service.get("State") == "running",
            "healthy": service.get("Health") == "healthy", "container": service.get("Name"),
        }  # fmt: skip

    def _redis_running(self) -> bool:
        return self._service("redis").get("State") == "running"

    def _status_extra(self, state: ReleaseState) -> dict:
        return {"generation": state.generation, "target": f"compose project {self.compose_settings.project}"}

    def _services(self, state: ReleaseState) -> dict[str, dict[str, Any]]:
        """`docker compose ps` by service; empty when compose cannot answer."""
        try:
            out = self.cli.run("ps", "--all", "--format", "json", env=self._tags(state))
        except CanaryError:
            return {}
        text = out.strip()
        rows: list[dict[str, Any]] = []
        if text.startswith("["):  # compose < 2.21 prints one array, later one object per line
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
        return {row.get("Service", ""): row for row in rows}


class ComposeNginx(NginxController):
    """The compose stack's nginx: asked through its published admin port, stopped as a
    compose service (`stop_service`), so it stands in for the local stack's controller."""

    def __init__(self, prefix: Path, admin_port: int, stop_service: Callable[[], object]) -> None:
        super().__init__(prefix, admin_port=admin_port)
        self._stop_service = stop_service

    def running(self) -> bool:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.admin_port}/canary/status", timeout=2, trust_env=False)
            return answer.status_code in (200, 401, 403)
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """`docker compose stop nginx`: the container stays, `up` starts it again."""
        self._stop_service()

    def wait_for_generation(self, generation: int, token: str, timeout_s: float = 30.0) -> None:
        """Until every nginx worker reports `generation` (a reload in a container is asynchronous)."""
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = self.status(token).get("config_generation")
                if seen == generation:
                    return
            except CanaryError:
                pass
            time.sleep(0.25)
        raise NginxError(f"nginx in the compose stack did not load config generation {generation} (saw {seen})")

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

Every compose call goes through `ComposeCli` (deploy/compose_cli.py): the engine's own
compose (Debian's docker-compose 1.29 included), health checks waited on by canary itself,
one line (`CanaryError`) for a missing engine or a failed command. The slots run the images
of `canary containerize`, Redis and nginx the image `canary base-image` builds from Debian
packages (the local stack's nginx with its Lua module, and Redis); Prometheus and Grafana run
when their images are present in the engine (or CANARY_COMPOSE_OBSERVABILITY=true).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from deploy.compose_cli import COMPOSE_DIR, ComposeCli, ComposeSettings
from deploy.image_settings import ImageSettings
from deploy.nginx import (
    MODULES_DIR,
    NginxController,
    NginxError,
    NginxLayout,
    NginxPorts,
    SlotAddress,
    ensure_token,
    serving,
)
from deploy.stack import LocalStack
from deploy.state import SLOTS, ReleaseState, SlotState
from models.errors import CanaryError
from models.home import CanaryHome

__all__ = ["COMPOSE_DIR", "ComposeCli", "ComposeNginx", "ComposeSettings", "ComposeStack"]

# Where the nginx container sees its mounts (deploy/compose/compose.yaml).
CONTAINER_RENDERED = Path("/etc/bento-canary/rendered")
CONTAINER_PREFIX = Path("/run/bento-canary")
CONTAINER_LAYOUT = NginxLayout(
    lua_dir=Path("/etc/bento-canary/nginx/lua"),
    modules_dir=MODULES_DIR,  # Debian's nginx-light + libnginx-mod-http-lua, as on the local stack
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
body = {"inputs": [{"name": "input", "shape": [len(rows), 64], "datatype": "FP32", "data": rows}],
        "parameters": {"cache": False}}
request = urllib.request.Request("http://127.0.0.1:%d/v2/models/digits/infer" % int(sys.argv[2]),
    data=json.dumps(body).encode(), headers={"content-type": "application/json"})
print(urllib.request.urlopen(request, timeout=30).read().decode())
"""


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
        self.cli = ComposeCli(s, home)
        self.images = ImageSettings()
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
        tag (compose needs both to read the file; that slot is not started), or `none` before
        anything is deployed (so `down` and `ps` still read the file after a failed `up`).
        Also where the public ports are published, and the Redis password, cache signing key
        and Grafana admin password, each from its 0600 file (compose.yaml demands them)."""
        stable = state.slots[state.stable].bento
        tags = {}
        for slot in SLOTS:
            bento = state.slots[slot].bento or stable
            tags[f"{slot.upper()}_TAG"] = image_tag(bento) if bento else "none"
        s = self.compose_settings
        password, cache_key = self.cache_secrets()
        return {
            **tags,
            "CANARY_IMAGE_REPOSITORY": self.images.repository,
            "CANARY_SERVICES_IMAGE": self.images.services_image,
            "CANARY_RENDERED_DIR": str(self.rendered.resolve()),  # nginx's bind mount
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
        env = self._tags(pending)
        image = f"{self.images.repository}:{image_tag(bento)}"
        if not self.cli.image_present(image):  # else compose tries a registry and fails on its error
            raise CanaryError(f"image {image} is not built: run `canary containerize {image_tag(bento)[1:]}` first")
        self.cli.run("up", "-d", "--no-deps", slot, env=env, timeout=self.compose_settings.wait_timeout_s + 30)
        try:
            self.cli.wait_healthy([slot], env, self.compose_settings.wait_timeout_s)
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
        services = ["redis", "nginx", *(("prometheus", "grafana") if self._observability() else ())]
        running = self.nginx().running()
        env = self._tags(state)
        self.cli.run("up", "-d", "--no-deps", *services, env=env, timeout=self.compose_settings.wait_timeout_s + 30)
        self.cli.wait_healthy(services, env, self.compose_settings.wait_timeout_s)
        if running:  # a changed config on a running nginx: reload it (HUP), as locally
            self.cli.run("kill", "-s", "HUP", "nginx", env=self._tags(state))
        self.nginx().wait_for_generation(generation, self.token_file.read_text().strip())

    def _observability(self) -> bool:
        """Prometheus and Grafana: as set, else when both their images are in the engine
        (no registry is needed to run the rest of the stack)."""
        if self.compose_settings.observability is not None:
            return self.compose_settings.observability
        services = yaml.safe_load(self.compose_settings.compose_file.read_text())["services"]
        return all(self.cli.image_present(services[name]["image"]) for name in ("prometheus", "grafana"))

    # -- the commands (`up`, `execute`, gate and rollout are LocalStack's) -------------------
    def _start_shared_services(self) -> None:
        """Redis starts with nginx (apply_nginx_config); compose reports taken ports itself."""

    def _slot_running(self, slot: str) -> bool:
        return self._service(slot).get("State") == "running"

    def down(self) -> list[str]:
        with self.store.locked():
            self.cli.run("down", "--remove-orphans", env=self._tags(self.store.load()))
        return ["compose project " + self.compose_settings.project]

    # -- status (LocalStack.status, with one `compose ps` for the containers) ---------------
    def status(self) -> dict:
        self._ps = self.cli.states(self._tags(self.store.load()))
        try:
            return super().status()
        finally:
            self._ps = None

    def _service(self, name: str) -> dict[str, Any]:
        ps = self._ps if self._ps is not None else self.cli.states(self._tags(self.store.load()))
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
        service = self.cli.states(self._tags(self.store.load())).get(slot, {})
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
        return {"generation": state.generation, "target": f"compose project {self.compose_settings.project}",
                "engine": self.cli.describe()}  # fmt: skip


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
                seen = serving(self.status(token))
                if seen == [generation]:
                    return
            except CanaryError:
                pass
            time.sleep(0.25)
        raise NginxError(f"nginx in the compose stack did not load config generation {generation} (saw {seen})")

"""`canary --target compose` through the real CLI: the same release flow as the local stack,
driving `docker compose` and the compose nginx's admin API.

`tests/support/fake_docker.py` stands in for the engine here (it records every compose call
and pretends the slot containers), for what the real engine cannot show quickly: the exact
calls, a smoke inference failing on demand, no engine at all. nginx is real: the fake runs
this machine's nginx on the config the CLI rendered for the container, mapped as the compose
file's mounts and published ports map it. Weights are read back from that nginx. The same
flow on the real engine and real containers: tests/deploy/test_container_engine.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from deploy.compose_target import ComposeSettings, ComposeStack
from deploy.process import free_port
from deploy.state import ReleaseState
from models.home import CanaryHome
from tests.support.canary_cli import CANARY, assert_one_line_error
from tests.support.listeners import listen_addresses

pytestmark = pytest.mark.slow
FAKE = Path(__file__).resolve().parents[1] / "support" / "fake_docker.py"


class ComposeWorld:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log, self.state = tmp / "docker.jsonl", tmp / "docker-state.json"
        self.rendered, self.prefix = tmp / "rendered", tmp / "nginx-prefix"
        docker = tmp / "docker"
        docker.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
        docker.chmod(0o755)
        self.ports = {"rest": free_port(), "grpc": free_port(), "admin": free_port()}
        self.env = {
            "CANARY_COMPOSE_DOCKER": str(docker),
            "CANARY_COMPOSE_RENDERED_DIR": str(self.rendered),
            "CANARY_COMPOSE_NAME": f"compose-{tmp.name}",
            "CANARY_COMPOSE_NGINX_REST_PORT": str(self.ports["rest"]),
            "CANARY_COMPOSE_NGINX_GRPC_PORT": str(self.ports["grpc"]),
            "CANARY_COMPOSE_NGINX_ADMIN_PORT": str(self.ports["admin"]),
            "FAKE_DOCKER_LOG": str(self.log),
            "FAKE_DOCKER_STATE": str(self.state),
            "FAKE_DOCKER_RENDERED": str(self.rendered),
            "FAKE_DOCKER_PREFIX": str(self.prefix),
        }

    def canary(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CANARY, "--target", "compose", *args], capture_output=True, text=True, timeout=300,
            env={**os.environ, **self.env, **extra},
        )  # fmt: skip

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def router(self) -> dict:
        token = (self.rendered / "admin.token").read_text().strip()
        answer = httpx.get(
            f"http://127.0.0.1:{self.ports['admin']}/canary/status", headers={"X-Canary-Token": token}, timeout=5
        )
        return answer.raise_for_status().json()

    def stop_nginx(self) -> None:
        """Our nginx, by the pid the fake recorded (only if `down` did not stop it)."""
        if self.state.exists() and (pid := json.loads(self.state.read_text()).get("nginx_pid")):
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def candidate_bento(canary_home, second_version) -> str:
    from models.bento import build_bento

    return build_bento(canary_home, version=second_version.version).tag


@pytest.fixture
def world(tmp_path, built_pipeline):
    w = ComposeWorld(tmp_path)
    yield w
    w.canary("down")
    w.stop_nginx()


def test_a_release_on_compose_runs_the_same_commands_through_compose_and_nginx(world, built_pipeline, candidate_bento):
    tag = built_pipeline.bento_tag.split(":")[1]  # digits-service:v<N> -> v<N>
    up = world.canary("up")
    assert up.returncode == 0, up.stderr
    # the stable slot was started with its image and smoke-tested before nginx came up
    changes = [c for c in world.calls() if c["argv"][5] != "ps"]  # ps only asks
    calls = [c["argv"][5:] for c in changes]
    assert calls[0] == ["up", "-d", "--no-deps", "blue"]
    assert changes[0]["tags"]["blue"] == tag
    assert calls[1][:3] == ["exec", "-T", "blue"]
    # no Prometheus or Grafana image in the (fake) engine: the stack runs without them
    assert calls[2] == ["up", "-d", "--no-deps", "redis", "nginx"]
    config = (world.rendered / "nginx.conf").read_text()
    assert "172.28.0.11" in config and "/etc/bento-canary/nginx/lua" in config
    assert "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;" in config  # Debian's nginx, as locally
    router = world.router()
    assert router["stable"] == "blue" and router["slots"]["blue"]["v2_port"] == 8000

    deploy = world.canary("deploy", candidate_bento)
    assert deploy.returncode == 0, deploy.stderr
    deploy_calls = [c for c in world.calls() if c["argv"][5] == "up"]
    assert deploy_calls[-1]["argv"][-1] == "green"
    assert deploy_calls[-1]["tags"] == {"blue": tag, "green": candidate_bento.split(":")[1]}
    assert world.router()["candidate"] == "green" and world.router()["weight"] == 0

    assert world.canary("weight", "30").returncode == 0
    assert world.router()["weight"] == 30
    status = world.canary("status")
    assert status.returncode == 0, status.stderr
    assert "blue   stable        70%" in status.stdout and "green  candidate     30%" in status.stdout
    assert world.canary("rollback", "--reason", "drill").returncode == 0
    assert world.router()["weight"] == 0
    assert world.canary("switch").returncode == 0
    assert world.router()["stable"] == "green"
    history = world.canary("history")
    assert "rollback" in history.stdout and "drill" in history.stdout

    down = world.canary("down")
    assert down.returncode == 0 and world.calls()[-1]["argv"][5] == "down"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{world.ports['admin']}/canary/status", timeout=2)


def test_a_candidate_failing_its_smoke_inference_gets_no_traffic(world, candidate_bento):
    assert world.canary("up").returncode == 0
    failed = world.canary("deploy", candidate_bento, FAKE_DOCKER_FAIL_SMOKE="green")
    assert_one_line_error(failed, "smoke inference on slot green failed")
    assert world.calls()[-1]["argv"][5:] == ["stop", "green"]
    router = world.router()
    assert router["candidate"] is None and router["weight"] == 0


def test_no_container_engine_is_one_clear_line(world, built_pipeline):
    missing = world.canary("up", CANARY_COMPOSE_DOCKER="/nonexistent/docker")
    assert_one_line_error(missing, "no container engine")
    no_daemon = world.canary("up", FAKE_DOCKER_NO_DAEMON="1")
    assert_one_line_error(no_daemon, "no container engine is running")


def test_the_compose_file_and_the_compose_target_agree_on_addresses_and_ports(tmp_path):
    import yaml

    from deploy.compose_target import CONTAINER_LAYOUT, SLOT_GRPC, SLOT_REST, SLOT_V2

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/compose/compose.yaml").read_text())
    subnet = compose["networks"]["canary"]["ipam"]["config"][0]["subnet"]
    settings = ComposeSettings()
    for slot in ("blue", "green"):
        service = compose["services"][slot]
        assert service["networks"]["canary"]["ipv4_address"] == getattr(settings, f"{slot}_address")
        assert {str(SLOT_REST), str(SLOT_GRPC), str(SLOT_V2)} <= set(service["expose"])
    assert subnet in CONTAINER_LAYOUT.admin_allow
    nginx = compose["services"]["nginx"]
    assert "${CANARY_RENDERED_DIR:-./rendered}:/etc/bento-canary/rendered:ro" in nginx["volumes"]
    rendered = ComposeStack(CanaryHome(home=tmp_path), settings)._tags(ReleaseState())["CANARY_RENDERED_DIR"]
    assert rendered == str(settings.rendered_dir.resolve())  # the CLI mounts the folder it renders into
    assert any(port.endswith(":8079") and port.startswith("127.0.0.1:") for port in nginx["ports"])
    # nothing is published on every interface unless CANARY_PUBLIC_HOST (the CLI's setting) says so
    public = "${CANARY_PUBLIC_HOST:-127.0.0.1}:"
    published = [port for service in compose["services"].values() for port in service.get("ports", ())]
    assert all(port.startswith(("127.0.0.1:", public)) for port in published), published
    rest, grpc = public + "${CANARY_REST_PORT:-8080}:8080", public + "${CANARY_GRPC_PORT:-8081}:8081"
    assert {port for port in nginx["ports"] if port.startswith(public)} == {rest, grpc}
    assert ComposeStack(CanaryHome(home=tmp_path), settings)._tags(ReleaseState())["CANARY_PUBLIC_HOST"] == "127.0.0.1"


def test_compose_tokens_are_private_grafana_gets_a_password_and_nginx_listens_where_told(tmp_path, monkeypatch):
    """In-process, no pipeline needed: the tokens nginx reads are 0600 (one an older version
    left 0644 included), Grafana's admin password is generated (0600), nginx's public ports
    are published on CANARY_COMPOSE_PUBLIC_HOST (the fake binds them as compose would), and the
    admin API refuses to move a slot off the compose network's slot addresses."""
    world = ComposeWorld(tmp_path)
    for key, value in {**world.env, "CANARY_COMPOSE_PUBLIC_HOST": "127.0.0.2"}.items():
        monkeypatch.setenv(key, value)
    world.rendered.mkdir()
    old_token = world.rendered / "admin.token"
    old_token.write_text("token-from-an-older-version\n")
    old_token.chmod(0o644)
    stack = ComposeStack(CanaryHome(home=tmp_path / "home"), ComposeSettings())
    try:
        stack.apply_nginx_config(ReleaseState())
        for path in (old_token, world.rendered / "force.token"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(stack.grafana_password_file.stat().st_mode) == 0o600
        password = stack._tags(ReleaseState())["CANARY_GRAFANA_PASSWORD"]
        assert len(password) >= 32 and password == stack.grafana_password_file.read_text().strip()
        assert listen_addresses(world.ports["rest"]) == listen_addresses(world.ports["grpc"]) == {"127.0.0.2"}
        assert listen_addresses(world.ports["admin"]) == {"127.0.0.1"}
        body = {"stable": "blue", "candidate": None, "weight": 0, "shadow": False,
                "slots": {"green": {"host": "10.9.9.9", "rest_port": 3000, "grpc_port": 50051}}}  # fmt: skip
        answer = httpx.put(f"http://127.0.0.1:{world.ports['admin']}/canary/routing", json=body, timeout=5,
                           headers={"X-Canary-Token": "token-from-an-older-version"}, trust_env=False)  # fmt: skip
        refused = "slot green: host 10.9.9.9 is not a slot host of this config (172.28.0.11, 172.28.0.12)"
        assert (answer.status_code, answer.json()["error"]) == (400, refused)
    finally:
        stack.down()
        world.stop_nginx()


def test_the_compose_nginx_stands_in_for_the_local_controller(tmp_path, monkeypatch):
    """`ComposeStack.nginx()` answers what the local stack asks of its controller: stop()
    stops the nginx service of the project (it used to raise)."""
    from deploy.compose_target import ComposeStack
    from models.home import CanaryHome

    world = ComposeWorld(tmp_path)
    for key, value in world.env.items():
        monkeypatch.setenv(key, value)
    stack = ComposeStack(CanaryHome(home=tmp_path / "home"))
    controller = stack.nginx()
    assert not controller.running()  # nothing answers on the admin port
    controller.stop()
    assert world.calls()[-1]["argv"][5:] == ["stop", "nginx"]
